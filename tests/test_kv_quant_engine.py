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
    assert (layer.kv_quant.rotation is not None) == (kv == "int4")


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


@pytest.fixture(scope="module")
def wide_kv_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with K and V 1000x larger and q_proj, o_proj 1000x smaller: the same model,
    whose K and V overflow fp8 at a scale of 1.0."""
    import shutil
    from safetensors.torch import load_file, save_file
    out = str(tmp_path_factory.mktemp("wide-kv"))
    shutil.copytree(tiny_llama_dir, out, dirs_exist_ok=True)
    path = os.path.join(out, "model.safetensors")
    w = load_file(path)
    for name in w:
        if ".k_proj." in name or ".v_proj." in name:
            w[name] = w[name] * 1000
        elif ".q_proj." in name or ".o_proj." in name:
            w[name] = w[name] / 1000
    save_file(w, path, metadata={"format": "pt"})
    return out


def test_calculate_kv_scales(wide_kv_dir, tiny_llama_dir):
    """--calculate-kv-scales: each layer's fp8 K and V scales come from the first forward's data
    (amax / 448), and the output stays close to the unquantized cache (the logprobs of fixed
    texts, every token reading the cache), as close as fp8 at 1.0 on the unscaled model, where
    the scale of 1.0 saturates."""
    from pagoda.kernels.kv_quant import FP8_MAX
    prompts = [{"prompt_token_ids": p} for p in random_prompts(4, 40, 80, 49152, seed=5)]
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0)

    def run(path, **kw):
        llm = LLM(path, max_model_len=512, num_gpu_blocks_override=128,
                  enable_prefix_caching=False, **kw)
        outs = llm.generate(prompts, sp, use_tqdm=False)
        lps = torch.tensor([d[t].logprob for o, p in zip(outs, prompts)
                            for d, t in zip(o.prompt_logprobs[1:], p["prompt_token_ids"][1:])])
        return llm, lps

    def err(lps, ref):
        return (lps - ref).abs().mean().item()

    _, ref = run(wide_kv_dir)
    _, fixed = run(wide_kv_dir, kv_cache_dtype="fp8")
    llm, calc = run(wide_kv_dir, kv_cache_dtype="fp8", calculate_kv_scales=True)
    _, plain_ref = run(tiny_llama_dir)
    _, plain_fp8 = run(tiny_llama_dir, kv_cache_dtype="fp8")
    print(f"mean |logprob error|: calculated scales {err(calc, ref):.4f}, scale 1.0 "
          f"{err(fixed, ref):.4f}, the unscaled model at 1.0 {err(plain_fp8, plain_ref):.4f}")
    assert err(calc, ref) < 2 * err(plain_fp8, plain_ref) and err(calc, ref) < err(fixed, ref) / 4
    layers = llm.llm_engine.core.worker.model.attention_layers()
    scales = torch.stack([layer.kv_quant.fp8_scales for layer in layers])
    assert not any(layer.calculate_kv_scales for layer in layers)
    assert (scales > 1).all() and len(set(scales.flatten().tolist())) == scales.numel(), scales
    # the measurement: the next forward after re-arming sets the scales from its own K and V
    seen = []
    hook = layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[1:]))
    layers[0].calculate_kv_scales = True
    llm.generate(prompts[:1], sp, use_tqdm=False)
    hook.remove()
    k, v = seen[0]
    want = torch.stack([k.abs().amax(), v.abs().amax()]) / FP8_MAX["fp8_e4m3"]
    assert torch.allclose(layers[0].kv_quant.fp8_scales, want)
