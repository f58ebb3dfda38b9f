"""Structured outputs in the engine: the params, grammar building and its errors, the bitmask kernel
against its torch reference, compilation off the hot path, and constrained requests in batches
with free ones (whose tokens must not change), step by step and overlapped."""
from __future__ import annotations

import json
import re
import threading
import time

import msgspec
import pytest
import torch

from pagoda import SamplingParams
from pagoda.engine.messages import EngineCoreRequest
from pagoda.kernels.grammar_bitmask import unpack_bitmask
from pagoda.sample.grammar_bitmask import apply_token_bitmask
from pagoda.engine.scheduler_output import GrammarBitmask
from pagoda.sampling_params import StructuredOutputsParams as SO
from pagoda.structured_output.grammar import GrammarError, build_grammar, validate_structured_outputs

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "member": {"type": "boolean"}}, "required": ["name", "age", "member"]}


# ------------------------------------------------------------------------------------- params

def test_params_take_exactly_one_constraint_and_cross_the_wire():
    with pytest.raises(ValueError, match="exactly one of"):
        SO()
    with pytest.raises(ValueError, match="exactly one of .* got json, regex"):
        SO(json=PERSON, regex="a+")
    with pytest.raises(ValueError, match="choice: must be a non-empty list"):
        SO(choice=[])
    with pytest.raises(ValueError, match="choice"):
        SO(choice="yes")
    assert SO(json_object=True).kind == "json_object"
    # vLLM's older offline spelling
    from pagoda.sampling_params import GuidedDecodingParams
    assert SamplingParams(guided_decoding=GuidedDecodingParams(regex="a+")).structured_outputs == SO(regex="a+")
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(guided_decoding=SO(regex="a"), structured_outputs=SO(regex="b"))
    # a dict becomes the params; the schema's text is the cache key (property order kept)
    sp = SamplingParams(structured_outputs={"json": PERSON})
    assert sp.structured_outputs.kind == "json" and sp.structured_outputs.spec == json.dumps(PERSON)
    assert SO(json=PERSON).key() == SO(json=json.dumps(PERSON)).key()
    assert SO(json=PERSON).key() != SO(json=PERSON, disable_any_whitespace=True).key()
    req = EngineCoreRequest("r", [1, 2], sp.clone(structured_outputs=SO(choice=["a", "b"],)))
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(req), type=EngineCoreRequest)
    assert back.sampling_params.structured_outputs == SO(choice=["a", "b"])
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(EngineCoreRequest("r", [1], sp)), type=EngineCoreRequest)
    assert back.sampling_params.structured_outputs.json == PERSON


@pytest.mark.parametrize("so, field, message", [
    (SO(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "json", "Unsupported type"),
    (SO(json="{not json"), "json", "not valid JSON"),
    (SO(json='["a list"]'), "json", "must be a JSON object"),
    (SO(regex="(unclosed"), "regex", "parenthesis"),
    (SO(grammar="root ::= undefined_rule"), "grammar", "not defined"),
    (SO(grammar="start: ("), "grammar", ""),
    (SO(structural_tag='{"type": "structural_tag", "format": {"type": "nope"}}'), "structural_tag", ""),
    (SO(json=PERSON, whitespace_pattern="[ "), "whitespace_pattern", ""),
])
def test_bad_constraints_name_their_field(so, field, message):
    with pytest.raises(GrammarError) as e:
        validate_structured_outputs(so)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ") and message in str(e.value)
    assert "/project/" not in str(e.value)  # xgrammar's source locations are cleaned off


# ------------------------------------------------------------------------------- grammars

@pytest.fixture(scope="module")
def compiler(smollm_side_dir):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(smollm_side_dir)
    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)))


def matches(compiler, so: SO, text: str) -> bool:
    import xgrammar as xgr
    m = xgr.GrammarMatcher(compiler.compile_grammar(build_grammar(so)))
    return m.accept_string(text) and m.is_completed()


def test_each_kind_accepts_what_it_should(compiler):
    assert matches(compiler, SO(json=PERSON), '{"name": "Ann", "age": 30, "member": true}')
    assert not matches(compiler, SO(json=PERSON), '{"name": "Ann", "age": 30}')        # required
    assert not matches(compiler, SO(json=PERSON), '{"name": "Ann", "age": 3.5, "member": true}')
    assert matches(compiler, SO(json_object=True), '{"any": [1, {"x": null}]}')
    assert not matches(compiler, SO(json_object=True), '[1, 2]')                        # an object
    assert matches(compiler, SO(regex=r"\d{3}-\d{4}"), "555-1234")
    assert not matches(compiler, SO(regex=r"\d{3}-\d{4}"), "555-12345")
    tricky = ['say "hi"', "back\\slash", "two\nlines", "ünïcode"]
    assert all(matches(compiler, SO(choice=tricky), c) for c in tricky)
    assert not matches(compiler, SO(choice=tricky), "say")
    # xgrammar 0.2 misreads "ü" followed by a hex digit in one literal: worked around (grammar.py)
    assert matches(compiler, SO(json={"enum": ["über", "ïc", "plain"]}), '"über"')
    assert matches(compiler, SO(json={"enum": ["über", "ïc", "plain"]}), '"ïc"')
    assert not matches(compiler, SO(json={"enum": ["über", "ïc", "plain"]}), '"uber"')
    assert matches(compiler, SO(grammar='root ::= "yes" | "no"'), "no")                 # EBNF
    assert matches(compiler, SO(grammar='start: "yes" | "no"'), "yes")                  # Lark
    assert not matches(compiler, SO(grammar='start: "yes" | "no"'), "maybe")


def test_whitespace_options(compiler):
    spaced = '{"name": "A", "age": 1, "member": false}'
    compact = spaced.replace(": ", ":").replace(", ", ",")
    assert matches(compiler, SO(json=PERSON), spaced) and matches(compiler, SO(json=PERSON), compact)
    assert not matches(compiler, SO(json=PERSON, disable_any_whitespace=True), spaced)
    assert matches(compiler, SO(json=PERSON, disable_any_whitespace=True), compact)
    one_space = SO(json=PERSON, whitespace_pattern="[ ]?")
    assert matches(compiler, one_space, spaced) and matches(compiler, one_space, compact)
    assert not matches(compiler, one_space, spaced.replace(": ", ":  "))
    assert not matches(compiler, one_space, spaced.replace(", ", ",\n"))
    newlines = SO(json=PERSON, whitespace_pattern="\n?")
    assert matches(compiler, newlines, compact.replace(",", ",\n"))
    assert not matches(compiler, newlines, spaced)


# ------------------------------------------------------------------------------ the kernel

def _kernels():
    from pagoda.kernels.grammar_bitmask import apply_bitmask_rows, apply_bitmask_rows_cpu
    from pagoda.kernels.grammar_bitmask_triton import apply_bitmask_rows_triton
    out = [("cpu", apply_bitmask_rows_cpu, "cpu"), ("triton", apply_bitmask_rows_triton, "cpu")]  # interpreted
    if torch.cuda.is_available():
        out.append(("cuda", apply_bitmask_rows, "cuda"))
    return out


@pytest.mark.parametrize("kernel", _kernels(), ids=lambda k: k[0])
@pytest.mark.parametrize("vocab,grammar_vocab", [(100, 100), (4099, 4099), (4099, 3001), (5000, 4096)])
def test_bitmask_kernels_match_torch_reference(kernel, vocab, grammar_vocab):
    """Chosen rows masked by their bitmask row, ids past the grammar's vocabulary (a padded
    model vocabulary) masked too, every other row untouched."""
    from pagoda.kernels.grammar_bitmask import apply_bitmask_rows_reference
    name, fn, device = kernel
    g = torch.Generator().manual_seed(vocab + grammar_vocab)
    n = 7
    logits = torch.randn(n, vocab, generator=g)
    words = (grammar_vocab + 31) // 32
    for rows in ([5, 1, 6], list(range(n)), [3]):
        bitmask = torch.randint(-(1 << 31), (1 << 31) - 1, (len(rows), words), generator=g,
                                dtype=torch.int64).to(torch.int32)
        want = apply_bitmask_rows_reference(logits.clone(), bitmask, rows, grammar_vocab)
        idx = rows if name == "cpu" else torch.tensor(rows, dtype=torch.int32, device=device)
        got = fn(logits.clone().to(device), bitmask.to(device), idx, grammar_vocab)
        assert torch.equal(got.cpu(), want), (name, rows)
        free = [i for i in range(n) if i not in rows]
        assert torch.equal(got[free].cpu(), logits[free])
        assert (got[rows[0], grammar_vocab:] == float("-inf")).all()
        assert unpack_bitmask(bitmask[:1], grammar_vocab).sum() == (got[rows[0]] > float("-inf")).sum().cpu()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_step_bitmask_reaches_its_requests_rows(device):
    from pagoda.kernels.grammar_bitmask import apply_bitmask_rows_reference
    g = torch.Generator().manual_seed(3)
    rows, vocab = 7, 4099
    logits = torch.randn(rows, vocab, generator=g).to(device)
    words = (4000 + 31) // 32
    bitmask = torch.randint(-(1 << 31), (1 << 31) - 1, (4, words), generator=g, dtype=torch.int64).to(torch.int32)
    req_ids = [f"r{i}" for i in range(rows)]
    constrained = ["r5", "r1", "gone", "r6"]   # "gone": not in this step (the runner failed it)
    out = apply_token_bitmask(logits.clone(), GrammarBitmask(constrained, bitmask, vocab_size=4000), req_ids)
    want = apply_bitmask_rows_reference(logits.clone().cpu(), bitmask[[0, 1, 3]], [5, 1, 6], 4000)
    assert torch.equal(out.cpu(), want)
    assert apply_token_bitmask(logits, None, req_ids) is logits
    assert apply_token_bitmask(logits, GrammarBitmask([], bitmask[:0]), req_ids) is logits


def test_a_bitmask_whose_fill_failed_fails_every_time():
    def boom():
        raise RuntimeError("fill failed")
    gb = GrammarBitmask(["a"], fill=boom)
    for _ in range(2):  # the runner's one-by-one retry must not sample unconstrained
        with pytest.raises(RuntimeError, match="fill failed"):
            apply_token_bitmask(torch.zeros(1, 40), gb, ["a"])


# ------------------------------------------------------------------------- in the engine

CHATS = ["Describe a person as JSON.", "What is the capital of France?", "Give me a phone number.",
         "Write a haiku about the sea.", "List three colors.", "What is 2 + 2?", "Say hello.",
         "Name a fruit."]


def chat_prompts(llm, n: int) -> list[dict]:
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": CHATS[i % len(CHATS)]}], tokenize=False,
                                     add_generation_prompt=True) for i in range(n)]
    return [{"prompt_token_ids": tok(t, add_special_tokens=False).input_ids} for t in texts]


CONSTRAINTS = [SO(json=PERSON), SO(choice=["Paris", "London", "Rome"]), SO(regex=r"\(\d{3}\) \d{3}-\d{4}"),
               SO(grammar='root ::= "The sea " [a-z ]{1,24} "."'),
               SO(json={"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}),
               SO(json={"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]},
                        "minItems": 3, "maxItems": 3}),
               SO(json={"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}),
               SO(choice=["hello", "hi"])]


def check(so: SO, text: str) -> None:
    import jsonschema
    if so.kind == "json":
        jsonschema.validate(json.loads(text), so.json)
    elif so.kind == "choice":
        assert text in so.choice
    elif so.kind == "regex":
        assert re.fullmatch(so.regex, text), text
    else:
        assert re.fullmatch(r"The sea [a-z ]{1,24}\.", text), text


@pytest.mark.parametrize("overlap", [False, True])
def test_half_constrained_batch_leaves_the_free_half_unchanged(bundled_llm, overlap):
    """16 requests, 8 of them constrained: each constrained output follows its constraint, and
    the 8 free requests' tokens equal a run of the free 8 alone (step by step, then overlapped)."""
    llm = bundled_llm
    core = llm.llm_engine.core
    prompts = chat_prompts(llm, 16)
    free = [SamplingParams(temperature=0, max_tokens=16) for _ in range(8)]
    constrained = [SamplingParams(temperature=0, max_tokens=64, structured_outputs=so) for so in CONSTRAINTS]
    core.overlap = False
    alone = llm.generate(prompts[1::2], free, use_tqdm=False)
    params = [p for pair in zip(constrained, free) for p in pair]
    core.overlap = overlap
    try:
        mixed = llm.generate(prompts, params, use_tqdm=False)
    finally:
        core.overlap = False
    assert [o.outputs[0].token_ids for o in mixed[1::2]] == [o.outputs[0].token_ids for o in alone]
    for so, out in zip(CONSTRAINTS, mixed[0::2]):
        assert out.outputs[0].finish_reason == "stop", (so, out.outputs[0].text)
        check(so, out.outputs[0].text)
    assert not core.structured_output.requests  # every matcher was dropped when its request ended
    assert core._inflight is None or not core.scheduler.running


def test_overlapped_constrained_outputs_equal_step_by_step(bundled_llm):
    llm = bundled_llm
    core = llm.llm_engine.core
    prompts = chat_prompts(llm, 8)
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=64, structured_outputs=so)
              for i, so in enumerate(CONSTRAINTS)]
    ref, got = step_by_step_then_overlapped(llm, prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    check_stopped(CONSTRAINTS, got)


def step_by_step_then_overlapped(llm, prompts, params):
    core = llm.llm_engine.core
    core.overlap = False
    ref = llm.generate(prompts, params, use_tqdm=False)
    core.overlap = True
    try:
        return ref, llm.generate(prompts, params, use_tqdm=False)
    finally:
        core.overlap = False


def check_stopped(constraints, outs) -> None:
    """Outputs that ended by their grammar follow their constraint."""
    for so, out in zip(constraints, outs):
        if out.outputs[0].finish_reason == "stop":
            check(so, out.outputs[0].text)


def test_mixed_batch_stays_overlapped_with_step_by_step_outputs(bundled_llm, monkeypatch):
    """Constrained rows beside free ones (sampled, penalties, logprobs) keep every step
    overlapped — the matchers advance one step behind, the bitmask fills while the forward pass
    runs — and every request's tokens equal the step-by-step run's."""
    from conftest import assert_same_outputs
    llm = bundled_llm
    core = llm.llm_engine.core
    prompts = chat_prompts(llm, 12)
    free = [SamplingParams(temperature=0.9, seed=40 + i, max_tokens=20 + i, repetition_penalty=1.2,
                           logprobs=2 if i % 2 else None) for i in range(6)]
    params = [p for pair in zip([SamplingParams(temperature=0.7, seed=i, max_tokens=48, structured_outputs=so)
                                 for i, so in enumerate(CONSTRAINTS[:6])], free) for p in pair]
    launched = overlapped = 0
    real_step = core.step

    def step():
        nonlocal launched, overlapped
        out = real_step()
        if core.overlap and out.scheduler_stats.step_kind:  # the overlapped run launched a step
            launched += 1
            overlapped += core._inflight is not None
        return out
    monkeypatch.setattr(core, "step", step)
    ref, got = step_by_step_then_overlapped(llm, prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    assert_same_outputs(got[3::4], ref[3::4])  # the free rows with logprobs (float noise of the batch)
    assert launched > 20 and overlapped == launched
    check_stopped(CONSTRAINTS, got[0::2])


def test_padded_vocabulary_ids_are_never_allowed_under_a_grammar(tmp_path, smollm_side_dir):
    """A model vocabulary wider than its tokenizer's (Qwen3: 151,936 ids over 151,669 tokens): the
    grammars compile against the tokenizer's ids only, and the ids past them are masked in
    constrained rows — a logit bias that makes a free row pick one cannot make a constrained
    row pick it."""
    from conftest import build_tiny
    from pagoda import LLM
    from transformers import AutoTokenizer
    n_tok = len(AutoTokenizer.from_pretrained(smollm_side_dir))
    path = build_tiny("llama", str(tmp_path / "padded"), smollm_side_dir, vocab_size=n_tok + 96)
    llm = LLM(path, max_model_len=256)
    pad = n_tok + 50
    bias = {pad: 100.0}
    so = SO(json={"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    params = [SamplingParams(temperature=0, max_tokens=24, logit_bias=bias, structured_outputs=so),
              SamplingParams(temperature=0, max_tokens=4, logit_bias=bias, ignore_eos=True)]
    for overlap in (False, True):
        llm.llm_engine.core.overlap = overlap
        cons, free = llm.generate([{"prompt_token_ids": [1, 5, 9]}] * 2, params, use_tqdm=False)
        assert free.outputs[0].token_ids == [pad] * 4
        assert all(t < n_tok for t in cons.outputs[0].token_ids)
        assert llm.llm_engine.core.structured_output.grammar_vocab_size == n_tok
        if cons.outputs[0].finish_reason == "stop":
            assert json.loads(cons.outputs[0].text)["ok"] in (True, False)
    llm.shutdown()


def test_grammars_compile_off_the_hot_path_once_per_schema(bundled_llm, monkeypatch):
    """A slow compilation holds back only its own requests: free requests run and finish
    meanwhile; requests with the same schema share one compilation."""
    llm = bundled_llm
    manager = llm.llm_engine.core.structured_output
    release = threading.Event()
    calls = []
    real = manager._compile

    def slow(so):
        calls.append(so.key())
        release.wait(60)
        return real(so)
    monkeypatch.setattr(manager, "_compile", slow)
    manager._grammars.clear()
    eng = llm.llm_engine
    prompts = chat_prompts(llm, 4)
    so = SO(json={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    for i in range(2):
        eng.add_request(f"c{i}", prompts[i], SamplingParams(temperature=0, max_tokens=20, structured_outputs=so))
    eng.add_request("free", prompts[2], SamplingParams(temperature=0, max_tokens=8))
    done = {}
    deadline = time.time() + 120
    while "free" not in done and time.time() < deadline:
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert "free" in done and not {"c0", "c1"} & done.keys()
    assert [r.request_id for r in eng.core.scheduler.waiting] == ["c0", "c1"]
    release.set()
    while eng.has_unfinished_requests() and time.time() < deadline:
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert len(calls) == 1  # one compilation for both requests
    for rid in ("c0", "c1"):
        assert isinstance(json.loads(done[rid].outputs[0].text)["n"], int)


def test_a_grammar_that_fails_to_compile_fails_its_request_only(bundled_llm, monkeypatch):
    llm = bundled_llm
    manager = llm.llm_engine.core.structured_output

    def broken(so):
        raise RuntimeError("cannot compile this one")
    monkeypatch.setattr(manager, "_compile", broken)
    manager._grammars.clear()
    eng = llm.llm_engine
    prompts = chat_prompts(llm, 2)
    eng.add_request("bad", prompts[0], SamplingParams(max_tokens=5, structured_outputs=SO(regex="x+")))
    eng.add_request("ok", prompts[1], SamplingParams(temperature=0, max_tokens=5))
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert "cannot compile this one" in eng.output_processor.failed.pop("bad")
    eng.output_processor.failed.clear()
    assert done["bad"].outputs[0].finish_reason == "error"
    assert done["ok"].outputs[0].finish_reason == "length"
    monkeypatch.undo()
    manager._grammars.clear()  # the failure is not cached: the next request compiles again
    out = llm.generate(prompts[0], SamplingParams(max_tokens=5, structured_outputs=SO(regex="x+")),
                       use_tqdm=False)
    assert set(out[0].outputs[0].text) == {"x"}


def test_offline_generate_rejects_a_bad_schema_before_it_runs(bundled_llm):
    with pytest.raises(ValueError, match="^json: Unsupported type"):
        bundled_llm.generate("hi", SamplingParams(structured_outputs=SO(json={"type": "nonsense"})),
                             use_tqdm=False)


@pytest.mark.slow
def test_tensor_parallel_ranks_mask_the_same_rows(tiny_llama_dir):
    """--tensor-parallel-size 2: every rank applies the step's bitmask (each feeds its own samples
    to its next step), overlapped or not, so constrained and free rows equal one device's."""
    from pagoda import LLM
    from test_tensor_parallel import free_ports
    prompts = [{"prompt_token_ids": [1, 5 + i, 9, 40 + 3 * i]} for i in range(6)]
    cons = [SO(choice=["Paris", "London", "Rome"]), SO(regex=r"[0-9]{3}-[0-9]{4}"),
            SO(json={"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})]
    params = [SamplingParams(temperature=0, max_tokens=24, structured_outputs=cons[i // 2]) if i % 2 == 0
              else SamplingParams(temperature=0, max_tokens=12, ignore_eos=True) for i in range(6)]

    def run(llm, overlap):
        llm.llm_engine.core.overlap = overlap
        return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    one = run(LLM(tiny_llama_dir, max_model_len=256), False)
    llm = LLM(tiny_llama_dir, max_model_len=256, tensor_parallel_size=2, master_port=free_ports())
    try:
        for overlap in (False, True):
            got = run(llm, overlap)
            assert [o.token_ids for o in got] == [o.token_ids for o in one]
    finally:
        llm.shutdown()
    assert one[0].text in ("Paris", "London", "Rome")
    if one[2].finish_reason == "stop":
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", one[2].text)


def slow_enum_schema(n: int = 60000) -> dict:
    """A schema xgrammar takes many seconds to compile against a vocabulary (the time grows
    faster than the number of values: 20k values ~2 s, 40k ~10 s on a 2-core CPU)."""
    return {"enum": [f"value_{i}_{i * 7919 % 10007}" for i in range(n)]}


def test_compile_threads_abandon_a_compilation_past_the_timeout():
    """The slow compilation's future fails after the timeout while it still runs; the one queued
    behind it (one thread) then runs; the preparation is not timed; the abandoned result still
    arrives, through on_late."""
    from pagoda.structured_output.compile_threads import CompileThreads, CompileTimeout
    release, late = threading.Event(), []
    pool = CompileThreads(1, 0.3, prepare=lambda: time.sleep(0.5),
                          on_late=lambda tag, result: late.append((tag, result)))
    slow = pool.submit(lambda: release.wait(30) and "slow done", tag="slow")
    quick = pool.submit(lambda: "quick done", tag="quick")
    deadline = time.time() + 20
    while not slow.done() and time.time() < deadline:
        pool.expire()
        time.sleep(0.05)
    assert isinstance(slow.exception(), CompileTimeout)
    assert quick.result(timeout=10) == "quick done"   # its 0.5 s preparation did not time it out
    assert not late
    release.set()
    while not late and time.time() < deadline:
        time.sleep(0.05)
    assert late == [("slow", "slow done")]
    assert CompileThreads(1, 0).expire() == []        # 0: no limit


def test_a_grammar_that_compiles_too_long_fails_as_the_requests_error(bundled_llm, monkeypatch):
    """A real slow schema under a 1 s limit: its request fails with a ValueError-kind error
    (`invalid`) naming the field, a quick constrained request and a free one finish meanwhile,
    and the same schema again fails at once."""
    llm = bundled_llm
    eng = llm.llm_engine
    manager = eng.core.structured_output
    monkeypatch.setattr(manager._pool, "timeout_s", 1.0)
    manager._grammars.clear()
    prompts = chat_prompts(llm, 3)
    slow = SO(json=slow_enum_schema(40000))   # ~10 s here: it runs on in this process
    t0 = time.time()
    eng.add_request("slow", prompts[0], SamplingParams(max_tokens=5, structured_outputs=slow))
    eng.add_request("quick", prompts[1], SamplingParams(temperature=0, max_tokens=5,
                                                        structured_outputs=SO(regex="[0-9]+")))
    eng.add_request("free", prompts[2], SamplingParams(temperature=0, max_tokens=5))
    done = {}
    while eng.has_unfinished_requests() and time.time() - t0 < 120:
        for out in eng.step():
            if out.finished:
                done[out.request_id] = (out, time.time() - t0)
    failed = eng.output_processor.failed
    assert "slow" in eng.output_processor.invalid
    assert failed.pop("slow") == "json: the grammar did not compile within 1 s (--structured-outputs-compile-timeout)"
    failed.clear()
    eng.output_processor.invalid.clear()
    assert done["slow"][0].outputs[0].finish_reason == "error"
    assert done["slow"][1] < 8   # the compilation itself runs on for many seconds more
    assert done["quick"][0].outputs[0].text.isdigit() and done["free"][0].outputs[0].finish_reason == "length"
    t1 = time.time()
    with pytest.raises(ValueError, match="^json: the grammar did not compile within 1 s"):
        llm.generate(prompts[0], SamplingParams(max_tokens=5, structured_outputs=slow), use_tqdm=False)
    assert time.time() - t1 < 1   # refused from the cache, not compiled (and timed out) again
