"""Stop strings: the Aho–Corasick matcher against a plain search on random texts, and the
detokenizer around it on the bundled tokenizer (no model). That many long stop strings no
longer slow other requests is tested against a live server in test_hostile_inputs.py."""
from __future__ import annotations

import random

import pytest

from pagoda.engine import detokenizer
from pagoda.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher, stop_matcher


def first_stop(stops, before: str, chunk: str):
    """Plain reference: the first stop string to end inside ``chunk`` (the longest of those
    ending at the same character), as (end offset in chunk, stop string)."""
    text = before + chunk
    for end in range(len(before) + 1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return end - len(before), max(ending, key=len)
    return None


def hold_back(stops, text: str) -> int:
    """Plain reference: the longest suffix of text that is a prefix of some stop string."""
    return max((k for s in stops for k in range(1, min(len(s), len(text)) + 1)
                if text.endswith(s[:k])), default=0)


@pytest.mark.parametrize("alphabet", ["ab", "abc", "ab "])
def test_matcher_equals_plain_search(alphabet):
    rng = random.Random(alphabet)
    for _ in range(800):
        stops = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
                       for _ in range(rng.randint(1, 5))})
        m = StopStringMatcher(stops)
        text, state = "", 0
        for _ in range(12):
            chunk = "".join(rng.choice(alphabet + "x") for _ in range(rng.randint(1, 4)))
            state, hit = m.step(state, chunk)
            assert hit == first_stop(stops, text, chunk), (stops, text, chunk)
            if hit:
                break
            text += chunk
            assert m.depth[state] == hold_back(stops, text), (stops, text)


@pytest.fixture(scope="module")
def tokenizer():
    from pagoda.worker import loader
    return loader.load_tokenizer(loader.resolve_model(None))


TEXT = ("Once upon a time there was a little girl who lived in a village near the forest. "
        "Whenever she went out, the little girl wore a red riding cloak. ")


def run(tokenizer, stop, include=False, min_ok_after=0):
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    d = IncrementalDetokenizer(tokenizer, ids[:1], True, stop, include)
    streamed = ""
    for i, t in enumerate(ids[1:]):
        hit = d.add_token(t, check_stop=i >= min_ok_after)
        if hit is not None:
            return hit, d.text, streamed
        stable = d.stable_len(False)
        assert stable >= len(streamed) and d.text[:len(streamed)] == streamed
        streamed = d.text[:stable]
        if not min_ok_after:  # never streams a stop string it later cuts
            assert not any(s in streamed for s in stop)
    return None, d.text, streamed


def test_detokenizer_cuts_at_the_first_stop(tokenizer):
    rest = TEXT[len(tokenizer.decode(tokenizer(TEXT, add_special_tokens=False).input_ids[:1])):]
    hit, text, _ = run(tokenizer, ["little girl", "village"])
    assert hit == "little girl" and text == rest[:rest.index("little girl")]
    hit, text, _ = run(tokenizer, ["village"], include=True)
    assert text == rest[:rest.index("village") + len("village")]
    # before min_tokens a stop string does not end generation; a later one still does
    hit, text, _ = run(tokenizer, ["little girl"], min_ok_after=12)
    assert hit == "little girl" and text == rest[:rest.rindex("little girl")]
    hit, _, streamed = run(tokenizer, ["no such text"])
    assert hit is None and len(streamed) > 100


def test_a_matcher_built_ahead_is_found_while_it_is_held(tokenizer):
    """The server builds a request's automaton on a tokenizer thread and holds it until the
    request's detokenizers are made: however many other stop lists are built meanwhile (one per
    request in flight), they find that one and build nothing on the event loop."""
    held = [stop_matcher((f"stop {i}", f"end {i}")) for i in range(20)]
    for i, m in enumerate(held):
        d = IncrementalDetokenizer(tokenizer, [1], True, [f"stop {i}", f"end {i}"], False)
        assert d.matcher is m
    d = IncrementalDetokenizer(tokenizer, [1], True, ["stop 0", "end 0"], False)
    del held, d
    import gc
    gc.collect()
    assert ("stop 0", "end 0") not in detokenizer._matchers  # nothing keeps automatons forever
