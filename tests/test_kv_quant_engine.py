"""A quantized KV cache in the engine: the scheduler's features (batching, preemption, chunked
prefill, prefix caching) give the same greedy tokens as each prompt alone on the same cache
format, because every token's K/V is quantized alone (per token, per head) whichever step writes
it; and on the bundled model the quantized cache stays close to the float one."""
from __future__ import annotations

import math
import os
import re

import pytest
import torch

from conftest import random_prompts
from pagoda import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def toks(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(10, 5, 90, 49152, seed=3)


@pytest.fixture(scope="module", params=["int8", "int4"])
def kv(request):
    return request.param


@pytest.fixture(scope="module")
def alone(tiny_llama_dir, prompts, kv):
    llm = LLM(tiny_llama_dir, max_model_len=1024, num_gpu_blocks_override=256, kv_cache_dtype=kv,
              enable_prefix_caching=False)
    return llm, [toks(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]


def test_cache_is_quantized(alone, kv):
    llm, _ = alone
    runner = llm.llm_engine.core.worker.runner
    layer = llm.llm_engine.core.worker.model.attention_layers()[0]
    assert layer.kv_cache.dtype == torch.uint8 and layer.kv_quant.kind == kv
    assert layer.kv_cache.shape[-1] == layer.head_dim // (2 if kv == "int4" else 1)
    assert layer.kv_quant.scales.shape == layer.kv_quant.zeros.shape == (2, 256, 16, layer.num_kv_heads)
    assert layer.kv_quant.scales.dtype == torch.float16 and layer.kv_quant.zeros.dtype == torch.uint8
    assert runner.block_bytes() == runner.kv_format.block_bytes(runner.num_layers, 16)
    assert layer.kv_quant.scales.float().abs().sum() > 0  # the scales were written


def test_batch_equals_each_alone(alone, prompts):
    llm, ref = alone
    assert toks(llm.generate(prompts, GREEDY, use_tqdm=False)) == ref


def test_preemption_finishes_identically(tiny_llama_dir, prompts, alone, kv):
    llm = LLM(tiny_llama_dir, max_model_len=112, num_gpu_blocks_override=14, kv_cache_dtype=kv,
              enable_prefix_caching=False)
    assert toks(llm.generate(prompts, GREEDY, use_tqdm=False)) == alone[1]
    assert llm.llm_engine.core.scheduler.num_preemptions > 0


def test_chunked_prefill_equals_unchunked(tiny_llama_dir, prompts, alone, kv):
    llm = LLM(tiny_llama_dir, max_model_len=1024, max_num_batched_tokens=7, kv_cache_dtype=kv,
              enable_prefix_caching=False)
    long = [p for p in prompts if len(p) > 40]
    assert long
    assert toks(llm.generate(long, GREEDY, use_tqdm=False)) == [alone[1][prompts.index(p)] for p in long]


def test_prefix_cache_hit_equals_cold(tiny_llama_dir, alone, kv):
    cold = alone[0]
    llm = LLM(tiny_llama_dir, max_model_len=1024, kv_cache_dtype=kv)
    base = random_prompts(1, 200, 200, 49152, seed=7)[0]
    a, b = base + [501, 502, 503], base + [601, 602]
    llm.generate([a], GREEDY, use_tqdm=False)
    bm = llm.llm_engine.core.kv_cache_manager
    hits = bm.hits
    got = toks(llm.generate([b], GREEDY, use_tqdm=False))[0]
    assert bm.hits > hits
    assert got == toks(cold.generate([b], GREEDY, use_tqdm=False))[0]


@pytest.mark.parametrize("policy,kind", [("4", "int4"), ("8", "int8")])
def test_serve_with_lmdeploy_quant_policy(policy, kind):
    """`pagoda serve --quant-policy N` (LMDeploy's flag) serves the bundled model on the CPU with
    that KV cache: the start-up log names the format and its capacity, and the OpenAI SDK gets
    a completion."""
    from server_utils import PagodaServer
    with PagodaServer(["--quant-policy", policy, "--max-model-len", "512", "--device", "cpu"]) as srv:
        out = srv.openai_client().completions.create(model=srv.openai_client().models.list().data[0].id,
                                                     prompt="The capital of France is", max_tokens=8,
                                                     temperature=0)
        assert out.choices[0].text and out.usage.completion_tokens == 8
        # the memory plan's capacity line, on the bundled model's shape (64-dim heads)
        got = re.search(rf"KV cache {kind}: .*; ([0-9.]+)x the tokens of a 16-bit cache", srv.log())
        assert got and float(got.group(1)) >= {"int8": 1.9, "int4": 3.5}[kind], srv.log()[-2000:]
