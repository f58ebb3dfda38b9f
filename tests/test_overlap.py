"""Overlapped steps (the engine reads each step's sampled ids back one step late, as it does on
CUDA) must give exactly the outputs of the step-by-step path: finishing by length, stop tokens and
stop strings at different steps, preemption, chunked prefill, prefix-cache hits, aborts, and
every sampling setting (penalties, logprobs, prompt logprobs, seeds, min_tokens, logit bias), none
of which may fall back to step-by-step. The logic is device-independent, so it is tested on the
CPU by switching `engine.overlap` on."""
from __future__ import annotations

import pytest

from conftest import random_prompts
from pagoda import LLM, SamplingParams
from pagoda.worker.input_batch import PLACEHOLDER as PENDING


def make(model_dir, overlap, **kw):
    llm = LLM(model_dir, max_model_len=256, **kw)
    llm.llm_engine.core.overlap = overlap
    return llm


def run(model_dir, prompts, params, **kw):
    """(outputs without overlap, outputs with overlap, the overlapped engine)."""
    ref = make(model_dir, False, **kw).generate(prompts, params, use_tqdm=False)
    llm = make(model_dir, True, **kw)
    got = llm.generate(prompts, params, use_tqdm=False)
    return ref, got, llm.llm_engine


def summary(outs):
    return [[(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in r.outputs] for r in outs]


def assert_idle(eng):
    eng.step()  # resolves a step still in flight, if any
    core = eng.core
    assert core._inflight is None
    assert not core.scheduler.running and not core.scheduler.waiting
    assert core.kv_cache_manager.num_free_blocks == core.kv_cache_manager.num_blocks


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(10, 5, 70, 49152, seed=11)


def test_lengths_and_stops_finish_at_the_same_token(tiny_llama_dir, prompts):
    base = make(tiny_llama_dir, False).generate(prompts, SamplingParams(temperature=0, max_tokens=24,
                                                                        ignore_eos=True), use_tqdm=False)
    params = []
    for i, r in enumerate(base):  # each request ends differently, at a different step
        toks, text = r.outputs[0].token_ids, r.outputs[0].text
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=3 + i, ignore_eos=True))
        elif i % 3 == 1:
            params.append(SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[toks[2 + i]]))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=24, stop=[text[len(text) // 2:][:3]]))
    ref, got, eng = run(tiny_llama_dir, prompts, params)
    assert summary(got) == summary(ref)
    assert {o.outputs[0].finish_reason for o in got} == {"length", "stop"}
    assert all(PENDING not in o.outputs[0].token_ids for o in got)
    assert eng.core.step_timing  # steps ran
    assert_idle(eng)


def test_preemption_chunked_prefill_and_prefix_hits(tiny_llama_dir, prompts):
    shared = prompts[0] * 3
    ps = prompts + [shared + [5, 6, 7], shared + [8, 9]]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    # 16 blocks of 16 tokens for ~12 requests of up to ~230 tokens: preemption; budget 40: chunks
    ref, got, eng = run(tiny_llama_dir, ps, params, num_gpu_blocks_override=16,
                        max_num_batched_tokens=40)
    assert summary(got) == summary(ref)
    assert eng.core.scheduler.num_preemptions > 0
    assert eng.core.kv_cache_manager.hits > 0
    assert_idle(eng)


def test_logprobs_penalties_and_seeded_sampling_mixed_in(tiny_llama_dir, prompts):
    params = []
    for i in range(len(prompts)):
        if i % 4 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2))
        elif i % 4 == 1:
            params.append(SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=12 + i,
                                         ignore_eos=True))
        elif i % 4 == 2:
            params.append(SamplingParams(temperature=0, max_tokens=14, ignore_eos=True,
                                         repetition_penalty=1.3))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    # first alone: plain greedy and seeded requests overlap; then everything together
    ref, got, _ = run(tiny_llama_dir, prompts[1::2], params[1::2])
    assert summary(got) == summary(ref)
    ref, got, eng = run(tiny_llama_dir, prompts, params)
    assert summary(got) == summary(ref)
    lp_ref = [[{k: round(v.logprob, 4) for k, v in d.items()} for d in r.outputs[0].logprobs]
              for r in ref[::4]]
    lp_got = [[{k: round(v.logprob, 4) for k, v in d.items()} for d in r.outputs[0].logprobs]
              for r in got[::4]]
    assert lp_got == lp_ref
    assert_idle(eng)


def test_abort_while_a_step_is_in_flight_and_streamed_deltas(tiny_llama_dir, prompts):
    ref = make(tiny_llama_dir, False).generate(prompts[:4], SamplingParams(temperature=0, max_tokens=16,
                                                                           ignore_eos=True), use_tqdm=False)
    eng = make(tiny_llama_dir, True).llm_engine
    eng.stream_outputs = True
    for i, p in enumerate(prompts[:4]):
        eng.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    streamed = {str(i): [] for i in range(4)}
    aborted = None
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            streamed[out.request_id] += out.delta_token_ids[0]
            assert PENDING not in out.outputs[0].token_ids
        steps += 1
        if steps == 6:
            assert eng.core._inflight is not None  # the abort lands while a step is launched
            aborted = eng.abort_request("1")
            streamed["1"] += aborted.delta_token_ids[0]
        assert steps < 100
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    toks = aborted.outputs[0].token_ids
    assert PENDING not in toks and 0 < len(toks) < 16
    assert toks == ref[1].outputs[0].token_ids[:len(toks)]
    for i in (0, 2, 3):
        assert streamed[str(i)] == ref[i].outputs[0].token_ids
    assert streamed["1"] == toks
    assert_idle(eng)


SETTINGS = [dict(temperature=0, repetition_penalty=1.4),
            dict(temperature=0, frequency_penalty=0.9, presence_penalty=0.6),
            dict(temperature=0, logprobs=3),
            dict(temperature=0, prompt_logprobs=2, logprobs=0),
            dict(temperature=0.9, top_p=0.8, seed=5),
            dict(temperature=1.0, top_k=30, min_p=0.02, repetition_penalty=1.2, seed=6),
            dict(temperature=1.1),  # unseeded: its seed comes from the engine's, in arrival order
            dict(temperature=0, min_tokens=6, stop_token_ids=[0, 1, 2]),
            dict(temperature=0, logit_bias={7: 3.0, 11: -2.0}),
            dict(temperature=0.8, top_p=0.95, logprobs=2, seed=9)]


def test_every_sampling_setting_stays_overlapped_with_the_same_outputs(tiny_llama_dir, prompts):
    params = [SamplingParams(max_tokens=10 + i, ignore_eos=True, **kw) for i, kw in enumerate(SETTINGS)]
    ref = make(tiny_llama_dir, False).generate(prompts, params, use_tqdm=False)
    llm = make(tiny_llama_dir, True)
    core = llm.llm_engine.core
    inflight = []
    step = core.step

    def watched():
        out = step()
        inflight.append(core._inflight is not None)
        return out
    core.step = watched
    got = llm.generate(prompts, params, use_tqdm=False)
    assert summary(got) == summary(ref)
    # every step but the last left its sampled ids on the device: no setting forced a sync
    assert len(inflight) > 15 and all(inflight[:-1]), inflight

    def lps(outs):
        return [[{t: round(v.logprob, 5) for t, v in d.items()} for d in o.outputs[0].logprobs]
                if o.outputs[0].logprobs is not None else None for o in outs]
    assert lps(got) == lps(ref)
    assert [o.prompt_logprobs for o in got] == [o.prompt_logprobs for o in ref]
    assert got[3].prompt_logprobs is not None and got[2].outputs[0].logprobs
    assert_idle(llm.llm_engine)


def test_finished_rows_leave_the_batch_across_idle_gaps(tiny_llama_dir, prompts):
    """The requests that finish in an overlapped run's last step are told to the worker with the
    next step that runs, even though the engine went idle in between: a full batch's worth of
    runs in a row must not fill the persistent batch (on the H200 the second W1 run in one engine
    failed with "more than 512 requests in the batch")."""
    llm = make(tiny_llama_dir, True, max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    runner = llm.llm_engine.core.model_executor.driver_worker.runner
    for _ in range(4):
        outs = llm.generate(prompts[:4], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
        assert len(runner.batch.requests) <= 4
        for _ in range(3):  # the engine idles (as a server's core does between requests)
            llm.llm_engine.core.step()
    llm.generate(prompts[:1], params, use_tqdm=False)
    assert set(runner.batch.requests) <= {"16"}
