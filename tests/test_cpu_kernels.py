"""The C kernels of the CPU path (pagoda/kernels/cpu_*.c) against their torch references."""
import pytest
import torch

from pagoda.kernels import cpu_build, cpu_fused, cpu_int8
from pagoda.kernels.activation import silu_and_mul_torch
from pagoda.kernels.attention import paged_attention_torch
from pagoda.kernels.cpu_attention import paged_attention_cpu
from pagoda.kernels.norm import fused_add_rms_norm_torch, rms_norm_torch
from pagoda.kernels.rotary import rotary_embedding_torch

pytestmark = pytest.mark.skipif(not cpu_int8.available(), reason="needs x86 AVX2 and a C compiler")


@pytest.mark.parametrize("M,N,K", [(1, 19, 64), (3, 300, 576), (8, 576, 1536), (13, 40, 96), (33, 7, 32)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_matmul_matches_reference(M, N, K, bias):
    g = torch.Generator().manual_seed(M * N + K)
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    q = cpu_int8.quantize_weight(w)
    ref = cpu_int8.int8_matmul_torch(x, *q, b)
    out = cpu_int8.int8_matmul(x, *q, b)
    assert out.shape == (M, N)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    # 8 bits per group of 32: close to the float weights too
    full = x @ w.T + (b if bias else 0)
    assert (out - full).norm() / full.norm() < 1e-2


def test_int8_grid_holds_gguf_blocks_exactly():
    g = torch.Generator().manual_seed(0)
    # Q4_1 blocks: d * q + m with q in 0..15 (both ends used, as llama.cpp's quantizer does)
    d, m = torch.rand(16, 4, 1, generator=g) * 0.1, -torch.rand(16, 4, 1, generator=g)
    q = torch.randint(0, 16, (16, 4, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    q41 = (q * d + m).reshape(16, 128)
    # Q8_0 blocks: d * q with q in -127..127, max |q| = 127
    q8 = torch.randint(-127, 128, (16, 4, 32), generator=g)
    q8[..., 0] = 127
    q80 = (q8 * d).reshape(16, 128)
    for w in (q41, q80):
        back = cpu_int8.dequantize_weight(*cpu_int8.quantize_weight(w))
        assert (back - w).abs().max() <= 1e-6 * w.abs().max()


def test_rms_norm_and_fused_add_match_reference():
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(5, 576, generator=g) for _ in range(2))
    w = torch.randn(576, generator=g)
    torch.testing.assert_close(cpu_fused.rms_norm_cpu(x, w, 1e-5), rms_norm_torch(x, w, 1e-5))
    out, res = cpu_fused.fused_add_rms_norm_cpu(x, r, w, 1e-6)
    ref_out, ref_res = fused_add_rms_norm_torch(x, r, w, 1e-6)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(res, ref_res)


@pytest.mark.parametrize("rot", [64, 32])
def test_rotary_in_place_on_strided_views_matches_reference(rot):
    g = torch.Generator().manual_seed(2)
    T, H, KV, D = 6, 4, 2, 64
    qkv = torch.randn(T, (H + 2 * KV) * D, generator=g)
    cache = torch.randn(100, rot, generator=g)
    pos = torch.tensor([0, 5, 17, 99, 3, 3])
    q = qkv[:, :H * D].view(T, H, D)
    k = qkv[:, H * D:(H + KV) * D].view(T, KV, D)
    rq, rk = rotary_embedding_torch(pos, q.clone(), k.clone(), cache)
    oq, ok = cpu_fused.rotary_embedding_cpu(pos, q, k, cache)
    torch.testing.assert_close(oq, rq)
    torch.testing.assert_close(ok, rk)
    assert oq.data_ptr() == q.data_ptr()  # rotated in place inside the projection output


def test_silu_and_mul_matches_reference():
    x = torch.randn(7, 2 * 1536, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cpu_fused.silu_and_mul_cpu(x), silu_and_mul_torch(x))


@pytest.mark.parametrize("isa", cpu_build.supported_isas())
@pytest.mark.parametrize("heads,kv_heads,D", [(4, 4, 64), (9, 3, 64), (16, 2, 128), (6, 2, 80)])
@pytest.mark.parametrize("window,cap", [(None, None), (1, None), (5, None), (16, None), (17, 3.0),
                                        (100, None), (None, 3.0)])
def test_paged_decode_attention_matches_reference(heads, kv_heads, D, window, cap, isa, monkeypatch):
    """Each instruction set's build; head sizes that are and are not a multiple of the register
    width; contexts shorter than, equal to and longer than one block of positions. Windows below,
    at and across block boundaries and beyond every sequence; blocks wholly before every query's
    window point at a NaN block (freed or reused), which must not be read."""
    monkeypatch.setenv("PAGODA_CPU_ISA", isa)
    g = torch.Generator().manual_seed(heads)
    nb, bs = 64, 16
    kv = torch.randn(2, nb + 1, bs, kv_heads, D, generator=g)
    kv[:, nb] = float("nan")
    # decodes at block boundaries (1, 16, 17, 32) and a long one (5+ position blocks) mixed with
    # a prefill chunk and a prefix hit
    qlens, lens = [1, 5, 1, 1, 1, 3, 1], [37, 20, 16, 1, 17, 32, 121]
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    perm = torch.randperm(nb, generator=g).to(torch.int32)
    bt = torch.stack([perm[i * 8:(i + 1) * 8] for i in range(len(lens))])
    if window is not None:
        for r, (ql, n) in enumerate(zip(qlens, lens)):
            bt[r, :max(0, n - ql - window + 1) // bs] = nb
    q = torch.randn(qsl[-1], heads, D, generator=g)
    args = (q, kv, torch.tensor(qsl, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), bt, 0.125)
    kw = dict(sliding_window=window, logits_soft_cap=cap)
    ref = paged_attention_torch(*args, qsl, lens, {}, **kw)
    out = paged_attention_cpu(*args, qsl, lens, {}, **kw)
    assert not ref.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    if window is not None and window < 100 or cap is not None:  # the options change the result
        assert not torch.allclose(out, paged_attention_torch(*args, qsl, lens, {}), atol=1e-3)


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("PAGODA_CPU_KERNELS", "0")
    assert cpu_build._build("cpu_fused") is None


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen2", "mistral"])
def test_fused_decode_layers_match_per_op_path(kind, request):
    """--quantization int8 on the CPU: decode steps through one C call per layer give the same
    tokens and logprobs as the per-op module path on the same weights (Qwen3's q/k norm,
    Qwen2's qkv bias and Mistral's sliding window included), for a batch whose requests have
    different lengths."""
    from pagoda import LLM, SamplingParams
    from conftest import assert_same_outputs, random_prompts
    llm = LLM(request.getfixturevalue(f"tiny_{kind}_dir"), quantization="int8", max_model_len=512,
              num_gpu_blocks_override=256)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(6, 3, 40, 49152, seed=4)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    fused = llm.generate(prompts, sp, use_tqdm=False)
    runner = llm.llm_engine.core.worker.runner
    assert runner.cpu_decoder is not None
    runner.cpu_decoder = None
    per_op = llm.generate(prompts, sp, use_tqdm=False)
    assert_same_outputs(fused, per_op)


def test_fused_decode_declines_gemma3(tiny_gemma3_dir):
    """Gemma 3's layers ((1 + w) norms around attention and MLP, GELU) are not the C layer's:
    its int8 decode steps stay on the per-op path."""
    from pagoda import LLM
    llm = LLM(tiny_gemma3_dir, quantization="int8", max_model_len=256, num_gpu_blocks_override=64)
    assert llm.llm_engine.core.worker.runner.kv_caches and llm.llm_engine.core.worker.runner.cpu_decoder is None
