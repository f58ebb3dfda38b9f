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


def _int8_cache(g, nb, bs, kv_heads, D):
    """An int8 cache (as --kv-cache-dtype int8 allocates it) holding random K/V in every slot."""
    from pagoda.kernels.kv_quant import write_cache_torch
    from pagoda.layers.quantization.kv_cache import KVCacheFormat
    fmt = KVCacheFormat("int8", torch.float32, kv_heads, D)
    (cache, kvq), = fmt.allocate(1, nb, bs, lambda shape, dtype: torch.zeros(shape, dtype=dtype))
    k = torch.randn(nb * bs, kv_heads, D, generator=g) * 3 + 0.5
    v = torch.randn(nb * bs, kv_heads, D, generator=g)
    write_cache_torch(k, v, cache, kvq, torch.arange(nb * bs))
    return cache, kvq


@pytest.mark.parametrize("isa", cpu_build.supported_isas())
@pytest.mark.parametrize("heads,kv_heads,D", [(4, 4, 64), (9, 3, 64), (16, 2, 128), (6, 2, 80),
                                             (4, 2, 20)])
@pytest.mark.parametrize("window,cap", [(None, None), (1, None), (5, None), (16, None), (17, 3.0),
                                        (100, None), (None, 3.0)])
@pytest.mark.parametrize("cache_dtype", ["float32", "int8"])
def test_paged_decode_attention_matches_reference(heads, kv_heads, D, window, cap, cache_dtype, isa,
                                                  monkeypatch):
    """Each instruction set's build; head sizes that are and are not a multiple of the register
    width; contexts shorter than, equal to and longer than one block of positions. Windows below,
    at and across block boundaries and beyond every sequence; blocks wholly before every query's
    window point at a NaN block (freed or reused), which must not be read. An int8 cache
    (--kv-cache-dtype int8) is dequantized inside the kernel's loop (its NaN block: NaN scales)."""
    from pagoda.kernels.cpu_attention import reads
    monkeypatch.setenv("PAGODA_CPU_ISA", isa)
    g = torch.Generator().manual_seed(heads)
    nb, bs = 64, 16
    if cache_dtype == "int8":
        kv, kvq = _int8_cache(g, nb + 1, bs, kv_heads, D)
        kvq.scales[:, nb] = float("nan")
    else:
        kv, kvq = torch.randn(2, nb + 1, bs, kv_heads, D, generator=g), None
        kv[:, nb] = float("nan")
    assert reads(kv, kvq)
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
    ref = paged_attention_torch(*args, qsl, lens, {}, kv_quant=kvq, **kw)
    out = paged_attention_cpu(*args, qsl, lens, {}, kv_quant=kvq, **kw)
    assert not ref.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    if window is not None and window < 100 or cap is not None:  # the options change the result
        assert not torch.allclose(out, paged_attention_torch(*args, qsl, lens, {}, kv_quant=kvq),
                                  atol=1e-3)
    if kvq is not None:  # the codes were dequantized: read as plain values they attend otherwise
        plain = paged_attention_cpu(q, kv.float(), *args[2:], qsl, lens, {}, **kw)
        assert not torch.allclose(out, plain, atol=1e-2)


@pytest.mark.parametrize("D", [64, 20])
def test_kv_write_int8_matches_reference_bit_for_bit(D):
    """The C quantize-on-write (the fused decode layers') stores the codes, scales and zero
    points the torch reference stores, from strided views into a qkv projection."""
    from pagoda.kernels.cpu_attention import kv_write_int8
    from pagoda.kernels.kv_quant import write_cache_torch
    g = torch.Generator().manual_seed(D)
    kvh, nb, bs, T = 3, 5, 4, 13
    qkv = torch.randn(T, (6 + 2 * kvh) * D, generator=g) * torch.linspace(0.01, 40, T)[:, None]
    qkv[3, 6 * D:] = qkv[3, 6 * D:].abs() + 0.5  # a token whose K and V are all positive
    qkv[4, 6 * D:] = 0.0   # and one all zero
    k = qkv[:, 6 * D:(6 + kvh) * D].view(T, kvh, D)
    v = qkv[:, (6 + kvh) * D:].view(T, kvh, D)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[7] = -1
    c1, q1 = _int8_cache(g, nb, bs, kvh, D)  # every slot written before: the others stay as they are
    c2, q2 = c1.clone(), type(q1)("int8", q1.scales.clone(), q1.zeros.clone())
    write_cache_torch(k, v, c1, q1, slots)
    kv_write_int8(k, v, c2, q2, slots)
    assert torch.equal(c1, c2) and torch.equal(q1.scales, q2.scales) and torch.equal(q1.zeros, q2.zeros)
    assert (q1.zeros.view(2, nb * bs, kvh)[:, slots[3]] == 0).all()
    assert (q1.scales.view(2, nb * bs, kvh)[:, slots[4]] == 0).all()


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("PAGODA_CPU_KERNELS", "0")
    assert cpu_build._build("cpu_fused") is None


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen2", "mistral"])
def test_fused_decode_layers_match_per_op_path(kind, request):
    """--quantization int8 on the CPU: decode steps through one C call per layer give the same
    tokens and logprobs as the per-op module path on the same weights (Qwen3's q/k norm,
    Qwen2's qkv bias and Mistral's sliding window included), for a batch whose requests have
    different lengths."""
    _fused_equals_per_op(request.getfixturevalue(f"tiny_{kind}_dir"))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_decode_layers_read_an_int8_kv_cache(kind, request):
    """--kv-cache-dtype int8 (--quant-policy 8): the fused layers quantize K/V as they write them
    and dequantize inside their attention loop, and give what the per-op path gives (the torch
    quantize-on-write, the C decode kernel over the int8 cache)."""
    llm = _fused_equals_per_op(request.getfixturevalue(f"tiny_{kind}_dir"), kv_cache_dtype="int8")
    layer = llm.llm_engine.core.worker.model.attention_layers()[0]
    assert layer.kv_cache.dtype == torch.uint8 and layer.kv_quant.kind == "int8"


def _fused_equals_per_op(model_dir, **kw):
    from pagoda import LLM, SamplingParams
    from conftest import assert_same_outputs, random_prompts
    llm = LLM(model_dir, quantization="int8", max_model_len=512, num_gpu_blocks_override=256, **kw)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(6, 3, 40, 49152, seed=4)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    fused = llm.generate(prompts, sp, use_tqdm=False)
    runner = llm.llm_engine.core.worker.runner
    assert runner.cpu_decoder is not None
    runner.cpu_decoder = None
    per_op = llm.generate(prompts, sp, use_tqdm=False)
    assert_same_outputs(fused, per_op)
    return llm


def test_fused_decode_declines_gemma3(tiny_gemma3_dir):
    """Gemma 3's layers ((1 + w) norms around attention and MLP, GELU) are not the C layer's:
    its int8 decode steps stay on the per-op path."""
    from pagoda import LLM
    llm = LLM(tiny_gemma3_dir, quantization="int8", max_model_len=256, num_gpu_blocks_override=64)
    assert llm.llm_engine.core.worker.runner.kv_caches and llm.llm_engine.core.worker.runner.cpu_decoder is None


def _sampling_rows(g, n, vocab):
    """Rows that exercise every branch of the row sampler: long rows (several chunks), a short
    width, min-p, top-p with rejections (a low top-p on flat rows), a row of -inf."""
    vals = torch.randn(n, vocab, generator=g) * torch.linspace(0.2, 4, n)[:, None]
    vals[-1] = float("-inf")
    width = torch.full((n,), vocab)
    width[1] = 37
    inv_t = 1 / (torch.rand(n, generator=g) + 0.4)
    min_p = torch.where(torch.arange(n) % 3 == 0, torch.rand(n, generator=g) * 0.3, torch.zeros(n))
    top_p = torch.where(torch.arange(n) % 2 == 0, torch.rand(n, generator=g) * 0.9 + 0.05, torch.ones(n))
    return vals, width, inv_t, min_p, top_p


def test_row_sampler_draws_what_its_torch_reference_draws():
    import numpy as np
    from pagoda.kernels.cpu_sampling import sample_rows_cpu
    from pagoda.kernels.sampling import sample_rows_torch
    g = torch.Generator().manual_seed(4)
    n, vocab = 12, 5000
    vals, width, inv_t, min_p, top_p = _sampling_rows(g, n, vocab)
    index = torch.arange(n).flip(0)
    seeds = np.array([3, 2**63 + 9, 2**64 - 1] * 4, dtype=np.uint64)
    same = total = 0
    for step in range(20):
        pos = np.arange(n, dtype=np.int64) * 1000 + step
        got = sample_rows_cpu(vals, index, width, inv_t, min_p, top_p, seeds, pos)
        ref = sample_rows_torch(vals, index, width, inv_t, min_p, top_p, seeds, pos)
        assert (got < width).all()
        same += int((got == ref).sum())
        total += n
    assert same >= 0.98 * total, f"{same}/{total}"  # exp/log roundings may move a boundary draw


def test_penalties_match_torch_reference_exactly():
    from pagoda.kernels.cpu_sampling import apply_penalties_cpu
    from pagoda.kernels.sampling import PROMPT_BIT, apply_penalties_torch
    g = torch.Generator().manual_seed(6)
    vocab = 3001
    logits = torch.randn(7, vocab, generator=g) * 3
    state = torch.randint(0, 4, (9, vocab), generator=g, dtype=torch.int32)
    state |= (torch.rand(9, vocab, generator=g) < 0.1).int() * PROMPT_BIT
    brows, srows = torch.tensor([6, 0, 3, 2, 5]), torch.tensor([1, 8, 0, 4, 2])
    rep = torch.tensor([1.3, 0.8, 1.0, 2.0, 1.1])
    freq = torch.tensor([0.0, 0.5, -0.4, 1.2, 0.1])
    pres = torch.tensor([0.3, 0.0, 1.0, -0.5, 0.2])
    got, ref = logits.clone(), logits.clone()
    apply_penalties_cpu(got, state, brows, srows, rep, freq, pres)
    apply_penalties_torch(ref, state, brows, srows, rep, freq, pres)
    assert torch.equal(got, ref)
    assert torch.equal(got[[1, 4]], logits[[1, 4]]) and not torch.equal(got[6], logits[6])
