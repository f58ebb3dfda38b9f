"""Continuous batching behaviour: batch invariance, prefix caching, n>1 block sharing, preemption
under a small KV cache, chunked prefill. All compared on greedy outputs of a tiny model."""
from __future__ import annotations

import pytest

from conftest import random_prompts
from pagoda import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def toks(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(16, 5, 90, 49152, seed=3)


@pytest.fixture(scope="module")
def reference(tiny_llm, prompts):
    """Each prompt alone."""
    return [toks(tiny_llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]


def test_batch_of_16_equals_each_alone(tiny_llm, prompts, reference):
    assert toks(tiny_llm.generate(prompts, GREEDY, use_tqdm=False)) == reference


def test_preemption_with_small_cache_finishes_all_identically(tiny_llama_dir, prompts, reference):
    # 14 blocks x 16 tokens: the longest request needs 7 blocks, all 16 together need ~60
    llm = LLM(tiny_llama_dir, max_model_len=112, num_gpu_blocks_override=14, enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert toks(outs) == reference
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    core = llm.llm_engine.core
    assert core.scheduler.num_preemptions > 0, "the cache was meant to be too small to hold everyone"
    assert core.kv_cache_manager.num_free_blocks == core.kv_cache_manager.num_blocks
    assert not core.scheduler.running and not core.scheduler.waiting


def test_chunked_prefill_equals_unchunked(tiny_llama_dir, prompts, reference):
    llm = LLM(tiny_llama_dir, max_model_len=1024, max_num_batched_tokens=7, enable_prefix_caching=False)
    long = [p for p in prompts if len(p) > 40]
    assert long
    got = toks(llm.generate(long, GREEDY, use_tqdm=False))
    assert got == [reference[prompts.index(p)] for p in long]


def test_prefix_cache_hit_gives_identical_output(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, max_model_len=1024)
    bm = llm.llm_engine.core.kv_cache_manager
    base = random_prompts(1, 200, 200, 49152, seed=7)[0]
    a, b = base + [501, 502, 503], base + [601, 602]
    cold = LLM(tiny_llama_dir, max_model_len=1024, enable_prefix_caching=False)
    expect_b = toks(cold.generate([b], GREEDY, use_tqdm=False))[0]
    llm.generate([a], GREEDY, use_tqdm=False)
    hits_before = bm.hits
    out = llm.generate([b], GREEDY, use_tqdm=False)[0]
    hit_tokens = bm.hits - hits_before
    assert hit_tokens == (200 // 16) * 16  # every full block of the shared 200-token prefix
    assert out.num_cached_tokens == hit_tokens
    assert out.outputs[0].token_ids == expect_b


def test_n4_shares_prompt_blocks(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, max_model_len=1024)
    bm = llm.llm_engine.core.kv_cache_manager
    prompt = random_prompts(1, 100, 100, 49152, seed=9)[0]
    eng = llm.llm_engine
    eng.add_request("n4", prompt, SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=3, ignore_eos=True))
    seqs = [eng.core.scheduler.requests[f"n4#{i}"] for i in range(4)]  # one engine request a sample
    eng.step()  # prefill of all four samples
    full = 100 // 16
    for s in seqs[1:]:
        assert s.block_ids[:full] == seqs[0].block_ids[:full]
    used = bm.num_blocks - bm.num_free_blocks
    assert used == full + 4 * 1  # shared full blocks + one private partial block per sample
    while eng.has_unfinished_requests():
        eng.step()
    assert bm.num_free_blocks == bm.num_blocks


def test_max_num_seqs_bounds_the_batch(tiny_llama_dir, prompts, reference):
    llm = LLM(tiny_llama_dir, max_model_len=1024, max_num_seqs=3)
    eng = llm.llm_engine
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, GREEDY)
    peak = 0
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[int(o.request_id)] = o.outputs[0].token_ids
        peak = max(peak, len(eng.core.scheduler.running))
    assert peak == 3
    assert [done[i] for i in range(len(prompts))] == reference


def test_a_request_that_fails_in_the_engine_fails_alone(tiny_llm, prompts, reference, monkeypatch):
    """Fault injection: sampling raises whenever one chosen request is in the batch. The engine
    retries the step request by request, fails only that one, and its neighbours finish with
    the same tokens as alone."""
    from pagoda.sample import sampler as sampler_mod
    eng = tiny_llm.llm_engine
    poison = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, seed=424242)
    real = sampler_mod.Sampler.__call__

    def flaky(self, logits, meta):
        if any(p.seed == 424242 for p in meta.params):
            raise OverflowError("injected: this request cannot be sampled")
        return real(self, logits, meta)
    monkeypatch.setattr(sampler_mod.Sampler, "__call__", flaky)

    ids = [f"iso-{i}" for i in range(6)]
    for i, rid in enumerate(ids):
        eng.add_request(rid, prompts[i], poison if i == 2 else GREEDY)
    finished = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
    assert set(eng.output_processor.failed) == {"iso-2"}
    assert "OverflowError" in eng.output_processor.failed["iso-2"]
    eng.output_processor.failed.clear()
    assert finished["iso-2"].outputs[0].finish_reason == "error"
    for i, rid in enumerate(ids):
        if i != 2:
            assert finished[rid].outputs[0].token_ids == reference[i], rid
    kv = eng.core.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks


def test_start_up_warm_up_leaves_no_trace(tiny_llama_dir, prompts, reference):
    """The warm-up the engine runs at start on a GPU (short/long prefills, a chunk over cached
    tokens, a mixed step, greedy and sampled rows) works on the CPU too and leaves nothing
    behind: no request state in the runner, every KV block free, outputs unchanged."""
    llm = LLM(tiny_llama_dir, max_model_len=1024, num_gpu_blocks_override=512)
    core = llm.llm_engine.core
    worker = core.worker
    worker.warm_up()
    assert "warm-up" in worker.startup.phases
    assert not worker.runner.batch.requests and not worker.runner._prev_rows
    assert core.kv_cache_manager.num_free_blocks == core.kv_cache_manager.num_blocks
    assert toks(llm.generate(prompts, GREEDY, use_tqdm=False)) == reference
