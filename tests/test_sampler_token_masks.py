"""allowed_token_ids and bad_words in the batched sampler, on fixed logits, against a one-row
reference of vLLM's definition: the processed logits equal it exactly (mixed batches, with and
without the last output token still on the device), masked tokens never come out over many
draws, and the other tokens keep their probabilities (chi-square). Also the front end's checks
and its tokenization of the words."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pagoda.kernels.sampling import reference_probs
from pagoda.sample.bad_words import PENDING
from pagoda.sample.sampler import Sampler
from pagoda.sample.state import SamplingState
from pagoda.sampling_params import SamplingParams
from test_sampler import LOGITS, V, assert_matches

NEG = float("-inf")


def reference_logits(logits: torch.Tensor, p: SamplingParams, out: list[int]) -> torch.Tensor:
    """One row by the definition: every token outside allowed_token_ids, every one-token bad
    word, and the last token of every longer bad word whose rest ends the output, get -inf;
    then the logit bias."""
    x = logits.clone().float()
    if p.allowed_token_ids is not None:
        keep = torch.zeros(V, dtype=torch.bool)
        keep[p.allowed_token_ids] = True
        x[~keep] = NEG
    for seq in p.bad_words_token_ids:
        prefix = seq[:-1]
        if len(prefix) <= len(out) and (not prefix or out[len(out) - len(prefix):] == prefix):
            x[seq[-1]] = NEG
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    return x


def state_of(params: list[SamplingParams]) -> SamplingState:
    st = SamplingState(len(params), V, torch.device("cpu"), 0)
    for r, p in enumerate(params):
        st.add(r, p, [])
    st.flush()
    return st


def tail_of(outputs: list[list[int]], pending_src=None):
    """The runner's OutputTail over plain lists (pending_src: the sampled-token index of each
    row whose last output is PENDING)."""
    def tail(i: int, m: int):
        return outputs[i][max(0, len(outputs[i]) - m):], (pending_src or {}).get(i, -1)
    return tail


def processed(st, params, logits, outputs, pending_src=None, prev_tokens=None):
    meta = st.metadata(params, np.arange(len(params)), np.array([len(o) for o in outputs]),
                       tail_of(outputs, pending_src), prev_tokens)
    return Sampler.processed_logits(logits.clone(), meta), meta


ROWS = [
    SamplingParams(temperature=0),                                                  # untouched
    SamplingParams(temperature=0, allowed_token_ids=[3, 17, 40, 41, 63]),
    SamplingParams(temperature=0, bad_words_token_ids=[[5], [9], [20, 21], [7, 8, 30]]),
    SamplingParams(temperature=0.7, allowed_token_ids=[1, 2, 20, 21, 22, 30],
                   bad_words_token_ids=[[21], [11, 22], [12, 13, 30]], logit_bias={2: 1.5, 22: -0.5}),
    SamplingParams(temperature=0, bad_words_token_ids=[[33, 34], [1, 2, 3, 4]], logit_bias={34: 3.0}),
]
OUTPUTS = [[1, 2, 3], [4], [7, 8], [12, 13, 11], [1, 2, 3, 33]]


def test_processed_logits_equal_the_reference_exactly():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(len(ROWS), V, generator=g)
    st = state_of(ROWS)
    got, meta = processed(st, ROWS, logits, OUTPUTS)
    ref = torch.stack([reference_logits(logits[i], p, o) for i, (p, o) in enumerate(zip(ROWS, OUTPUTS))])
    assert torch.equal(got, ref)
    # the cases above all fire: rows 2 (30 after 7 8), 3 (12 13 -> 30? no: 11 -> 22) and 4 (34)
    assert got[2, 30] == NEG and got[3, 22] == NEG and got[4, 34] == NEG
    assert got[2, 21] != NEG and got[4, 4] != NEG        # prefixes that do not end the output
    assert meta.bans is not None and not meta.bans.conditional
    # an output shorter than a prefix matches nothing; an empty output only one-token words
    got, _ = processed(st, ROWS, logits, [[], [], [], [], []])
    ref = torch.stack([reference_logits(logits[i], p, []) for i, p in enumerate(ROWS)])
    assert torch.equal(got, ref)


def test_a_row_taken_again_forgets_the_previous_requests_masks():
    st = state_of(ROWS)
    plain = [SamplingParams(temperature=0)] * len(ROWS)
    for r, p in enumerate(plain):
        st.add(r, p, [])
    st.flush()
    logits = torch.randn(len(ROWS), V)
    got, meta = processed(st, plain, logits, OUTPUTS)
    assert meta.all_plain_greedy and torch.equal(got, logits)


@pytest.mark.parametrize("hit", [True, False])
def test_the_last_output_token_still_on_the_device_is_checked_there(hit):
    """Overlapped steps: the host has a PENDING last token; the ban holds exactly when the
    device's sampled token completes the prefix."""
    params = [SamplingParams(temperature=0, bad_words_token_ids=[[7, 8, 30], [8, 31], [9, 32]]),
              SamplingParams(temperature=0, bad_words_token_ids=[[5, 6]])]
    real = [[1, 7, 8], [2, 5]]
    prev = torch.tensor([99, 8 if hit else 4, 5 if hit else 6])   # row 0's last sits at 1, row 1's at 2
    st = state_of(params)
    logits = torch.randn(2, V)
    host = [o[:-1] + [PENDING] for o in real]
    got, meta = processed(st, params, logits, host, {0: 1, 1: 2}, prev)
    assert meta.bans.conditional
    seen = real if hit else [[1, 7, 4], [2, 6]]
    ref = torch.stack([reference_logits(logits[i], p, o) for i, (p, o) in enumerate(zip(params, seen))])
    assert torch.equal(got, ref)
    assert (got[0, 30] == NEG) == hit and (got[0, 31] == NEG) == hit and (got[1, 6] == NEG) == hit
    assert got[0, 32] != NEG


def test_masked_tokens_never_drawn_and_the_rest_keep_their_probabilities():
    rows, steps = 1000, 100
    kw = dict(temperature=0.9, top_p=0.95)
    allowed = list(range(0, V, 3))
    # multiples of 3; 3 and 12 banned alone, 6 after the output's 50
    base = SamplingParams(**kw, allowed_token_ids=allowed, bad_words_token_ids=[[3], [12], [50, 6]])
    params = [base.clone(seed=7919 * i + 1) for i in range(rows)]
    st = state_of(params)
    logits = LOGITS.expand(rows, V)
    out = [[1, 50]] * rows
    counts = np.zeros(V, dtype=np.int64)
    sampler = Sampler()
    for pos in range(steps):
        meta = st.metadata(params, np.arange(rows), np.full(rows, pos), tail_of(out))
        counts += np.bincount(sampler(logits.clone(), meta).token_ids.numpy(), minlength=V)
    ref_row = reference_logits(LOGITS, params[0], out[0])
    for t in (3, 12, 6, 1, 2):
        assert ref_row[t] == NEG and counts[t] == 0
    probs = reference_probs(ref_row[None], torch.tensor([kw["temperature"]]), torch.tensor([0]),
                            torch.tensor([kw["top_p"]]), torch.tensor([0.0]))[0].numpy()
    assert (probs > 0).sum() > 10
    assert_matches(counts, probs, rows * steps)


def test_greedy_takes_the_best_allowed_token():
    logits = LOGITS[None].clone()
    allowed = [5, 17, 44]
    p = SamplingParams(temperature=0, allowed_token_ids=allowed)
    st = state_of([p])
    tok = Sampler()(logits.clone(), st.metadata([p], np.arange(1), np.zeros(1, np.int64))).token_ids
    assert int(tok) == allowed[int(LOGITS[allowed].argmax())] != int(LOGITS.argmax())


def test_sampling_params_check_the_fields():
    with pytest.raises(ValueError, match="allowed_token_ids must not be empty"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[1, -2])
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["ok", "  "])
    assert SamplingParams(bad_words="one").bad_words == ["one"]


def test_the_front_end_tokenizes_bad_words_with_and_without_a_space(bundled_llm):
    ip = bundled_llm.llm_engine.processor
    tok = bundled_llm.get_tokenizer()
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    assert len(enc("Paris")) == len(enc(" Paris")) and enc("Paris") != enc(" Paris")
    assert ip.bad_words_token_ids([" Paris"]) == [enc("Paris"), enc(" Paris")]
    vocab = bundled_llm.llm_engine.model_config.vocab_size
    _, _, reqs = ip.process("r", "Hello", SamplingParams(bad_words=["Paris", "New York"]))
    assert reqs[0].sampling_params.bad_words_token_ids == ip.bad_words_token_ids(["Paris", "New York"])
    with pytest.raises(ValueError, match=r"^allowed_token_ids: token id"):
        ip.process("r", "Hello", SamplingParams(allowed_token_ids=[0, vocab]))
