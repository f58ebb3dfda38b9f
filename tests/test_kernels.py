"""Triton kernels against their plain-torch references, on the CPU through TRITON_INTERPRET=1.

Each check draws fresh random inputs (seed printed on failure; set PAGODA_KERNEL_SEED to replay),
poisons the output (NaN) so unwritten elements fail, and compares with the reference evaluated
in float64 on the same inputs: relative error norm <= 1e-4 for fp32, <= 2e-2 for bf16/fp16.
Sizes are small because the interpreter runs every program in Python.
"""
import os

# Must be set before triton's @jit decorators run: they pick the interpreter at decoration time.
# It stays set for the session (triton checks it again on lazy imports); CPU-only anyway.
os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from pagoda.kernels import dispatch  # noqa: E402
from pagoda.kernels.activation import silu_and_mul_torch  # noqa: E402
from pagoda.kernels.attention import paged_attention_torch, reshape_and_cache_torch  # noqa: E402
from pagoda.kernels.norm import fused_add_rms_norm_torch, rms_norm_torch  # noqa: E402
from pagoda.kernels.rotary import rotary_embedding_torch  # noqa: E402
from pagoda.kernels import sampling  # noqa: E402


def _interpreted(name):
    """The kernel module, re-imported if an earlier test imported it without the interpreter."""
    mod = importlib.import_module(name)
    if not getattr(mod, "_INTERPRETED_FOR_TESTS", False):
        mod = importlib.reload(sys.modules[name])
        mod._INTERPRETED_FOR_TESTS = True
    return mod


attn = _interpreted("pagoda.kernels.attention_triton")
norm = _interpreted("pagoda.kernels.norm_triton")
rotary = _interpreted("pagoda.kernels.rotary_triton")
act = _interpreted("pagoda.kernels.activation_triton")
sampling_tri = _interpreted("pagoda.kernels.sampling_triton")

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@pytest.fixture
def gen():
    seed = int(os.environ.get("PAGODA_KERNEL_SEED", random.randrange(2**31)))
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def check(out, ref, dtype, g, what=""):
    assert not torch.isnan(out).any(), f"{what}: NaN in output (seed {g.initial_seed()})"
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: rel err {err:.2e} > {TOL[dtype]} (seed {g.initial_seed()})"


# ---------------------------------------------------------------- paged KV helpers

def paged_batch(g, q_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype, page=16):
    """Random q and a KV cache whose blocks are scattered at random; slots past each request's
    length are NaN so any read of them shows up. Unused block-table entries are 0 (valid)."""
    blocks = [(s + page - 1) // page for s in seq_lens]
    num_blocks = sum(blocks) + 2
    kv = randn(g, 2, num_blocks, page, num_kv_heads, head_dim, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=g)
    bt = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    used = 0
    for r, n in enumerate(blocks):
        bt[r, :n] = perm[used:used + n]
        used += n
        if seq_lens[r] % page:
            kv[:, bt[r, n - 1], seq_lens[r] % page:] = float("nan")
    kv[:, perm[used:]] = float("nan")  # blocks nobody owns
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = randn(g, int(qsl[-1]), num_heads, head_dim, dtype=dtype)
    return q, kv, qsl, torch.tensor(seq_lens, dtype=torch.int32), bt


def attention_ref(q, kv, qsl, sl, bt, scale, **kw):
    return paged_attention_torch(q.double(), kv.double(), qsl, sl, bt, scale, **kw)


def run_attention(q, kv, qsl, sl, bt, scale, **kw):
    out = torch.full_like(q, float("nan"))
    res = attn.paged_attention_triton(q, kv, qsl, sl, bt, scale, out=out, **kw)
    assert res is out
    return out


# ---------------------------------------------------------------- KV write

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache_matches_reference(gen, dtype):
    kv_heads, d, page, nb = 2, 32, 16, 6
    qkv = randn(gen, 9, (4 + 2 * kv_heads) * d, dtype=dtype)   # k, v are strided views
    k = qkv[:, 4 * d:(4 + kv_heads) * d].view(9, kv_heads, d)
    v = qkv[:, (4 + kv_heads) * d:].view(9, kv_heads, d)
    slots = torch.randperm(nb * page, generator=gen)[:9]
    slots[[2, 5]] = -1                                          # padding tokens
    cache = torch.full((2, nb, page, kv_heads, d), float("nan"), dtype=dtype)
    ref = cache.clone()
    attn.reshape_and_cache_triton(k, v, cache, slots)
    reshape_and_cache_torch(k, v, ref, slots)
    assert torch.equal(cache.isnan(), ref.isnan())              # same slots written, no others
    assert torch.equal(cache.nan_to_num(), ref.nan_to_num())
    written = slots[slots >= 0]
    assert not cache.view(2, nb * page, kv_heads, d)[:, written].isnan().any()


# ---------------------------------------------------------------- attention

GQA = [(4, 4), (8, 2), (8, 1)]  # ratios 1, 4, 8


@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [None, 3])
def test_decode_ragged_block_boundaries(gen, heads, dtype, splits):
    seq_lens = [1, 15, 16, 17, 33, 70]
    q, kv, qsl, sl, bt = paged_batch(gen, [1] * len(seq_lens), seq_lens, *heads, 32, dtype)
    out = run_attention(q, kv, qsl, sl, bt, 0.2, max_query_len=1, num_splits=splits)
    check(out, attention_ref(q, kv, qsl, sl, bt, 0.2), dtype, gen, f"splits={splits}")


def test_decode_picks_split_k_for_small_batches(gen):
    # 2 requests x 1 KV head on 8 "SMs": split-K must kick in and still be exact
    assert attn.decode_num_splits(2, 1, 300, 8) == 5       # 16 wanted, 300 keys allow 5
    assert attn.decode_num_splits(64, 8, 1024, 132) == 1   # 512 programs fill an H100
    assert attn.decode_num_splits(1, 8, 4096, 132) == 32
    seq_lens = [130, 300]
    q, kv, qsl, sl, bt = paged_batch(gen, [1, 1], seq_lens, 4, 1, 64, torch.float32)
    out = run_attention(q, kv, qsl, sl, bt, 0.125, max_query_len=1, max_seq_len=300)
    check(out, attention_ref(q, kv, qsl, sl, bt, 0.125), torch.float32, gen)


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_graph_padding_rows_are_zero(gen, splits):
    """CUDA-graph batches are padded with requests of 1 token and seq_len 0 (slot -1): their
    rows come out 0, never NaN, and the real rows are unaffected."""
    q, kv, qsl, sl, bt = paged_batch(gen, [1, 1, 1], [40, 7, 1], 8, 2, 32, torch.float32)
    ref = attention_ref(q, kv, qsl, sl, bt, 0.3)
    pad_q = torch.cat([q, randn(gen, 2, 8, 32)])
    pad_qsl = torch.arange(6, dtype=torch.int32)
    pad_sl = torch.cat([sl, torch.zeros(2, dtype=torch.int32)])
    pad_bt = torch.cat([bt, torch.zeros(2, bt.shape[1], dtype=torch.int32)])
    out = run_attention(pad_q, kv, pad_qsl, pad_sl, pad_bt, 0.3, max_query_len=1,
                        num_splits=splits)
    check(out[:3], ref, torch.float32, gen)
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))


@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_prefill_decode_with_prefix_hits(gen, heads, dtype):
    # q_len < seq_len: prefix-cache hits / later chunks; q_len == seq_len: fresh prompts;
    # q_len 1: decodes sharing the launch
    # the last three have whole key tiles before their queries; 62 and 63 cached keys put the
    # first query just before / at the end of a 32- and 64-key tile
    q_lens = [5, 1, 16, 17, 1, 40, 20, 3, 2]
    seq_lens = [5, 16, 48, 17, 33, 41, 150, 65, 65]
    q, kv, qsl, sl, bt = paged_batch(gen, q_lens, seq_lens, *heads, 32, dtype)
    ref = attention_ref(q, kv, qsl, sl, bt, 0.3)
    for hint in (None, max(q_lens)):
        out = run_attention(q, kv, qsl, sl, bt, 0.3, max_query_len=hint)
        check(out, ref, dtype, gen, f"hint={hint}")
    out = run_attention(q, kv, qsl, sl, bt, 0.3, tune={"split_mask": False, "block_n": 16})
    check(out, ref, dtype, gen, "all tiles masked")


@pytest.mark.parametrize("head_dim,page", [(64, 16), (128, 32), (48, 8)])
def test_head_dims_and_page_sizes(gen, head_dim, page):
    q_lens, seq_lens = [3, 1, 9], [20, 9, 9]
    q, kv, qsl, sl, bt = paged_batch(gen, q_lens, seq_lens, 4, 2, head_dim, torch.bfloat16, page)
    scale = head_dim ** -0.5
    check(run_attention(q, kv, qsl, sl, bt, scale), attention_ref(q, kv, qsl, sl, bt, scale),
          torch.bfloat16, gen, "prefill")
    q1 = q[qsl[1:].long() - 1].contiguous()  # one decode query per request
    qsl1 = torch.arange(4, dtype=torch.int32)
    check(run_attention(q1, kv, qsl1, sl, bt, scale, max_query_len=1, num_splits=2),
          attention_ref(q1, kv, qsl1, sl, bt, scale), torch.bfloat16, gen, "decode")


def test_chunked_prefill_through_the_cache(gen):
    """A second chunk written by reshape_and_cache then attended through the block table only,
    with q a strided view of a fused qkv tensor, equals the reference end to end."""
    h, kvh, d, page = 8, 2, 32, 16
    ctx, chunk = [20, 0], [13, 7]
    seq_lens = [c + n for c, n in zip(ctx, chunk)]
    _, kv, _, sl, bt = paged_batch(gen, chunk, seq_lens, h, kvh, d, torch.float32, page)
    qkv = randn(gen, sum(chunk), (h + 2 * kvh) * d)
    q = qkv[:, :h * d].view(-1, h, d)
    k = qkv[:, h * d:(h + kvh) * d].view(-1, kvh, d)
    v = qkv[:, (h + kvh) * d:].view(-1, kvh, d)
    pos = torch.cat([torch.arange(c, c + n) for c, n in zip(ctx, chunk)])
    req = torch.repeat_interleave(torch.arange(2), torch.tensor(chunk))
    slots = bt[req, pos // page].long() * page + pos % page
    qsl = torch.tensor([0, chunk[0], sum(chunk)], dtype=torch.int32)
    ref_kv = kv.clone()
    attn.reshape_and_cache_triton(k, v, kv, slots)
    reshape_and_cache_torch(k, v, ref_kv, slots)
    out = run_attention(q, kv, qsl, sl, bt, 0.25, max_query_len=max(chunk))
    check(out, attention_ref(q.contiguous(), ref_kv, qsl, sl, bt, 0.25), torch.float32, gen)


# ---------------------------------------------------------------- sliding window, soft cap

def drop_out_of_window_blocks(kv, qsl, sl, bt, window):
    """What a KV-cache manager that frees blocks outside the window may leave behind: blocks
    wholly before every query's window get their table entries pointed at a NaN block (stale,
    or handed to someone else). Returns the new cache and table."""
    page = kv.shape[2]
    kv = torch.cat([kv, torch.full_like(kv[:, :1], float("nan"))], dim=1)
    bt = bt.clone()
    dropped = 0
    for r in range(len(sl)):
        first_query = int(sl[r]) - int(qsl[r + 1] - qsl[r])
        dead = max(0, first_query - window + 1) // page
        bt[r, :dead] = kv.shape[1] - 1
        dropped += dead
    return kv, bt, dropped


def dense_attention(q, kv, qsl, sl, bt, scale, window=None, cap=None):
    """One query at a time from the definition: keys in (p - window, p], softmax, weighted V."""
    out = torch.zeros_like(q, dtype=torch.float64)
    page, group = kv.shape[2], q.shape[1] // kv.shape[3]
    for r in range(len(sl)):
        n, ql = int(sl[r]), int(qsl[r + 1] - qsl[r])
        for i in range(ql):
            p = n - ql + i
            keys = range(0 if window is None else max(0, p - window + 1), p + 1)
            k = torch.stack([kv[0, bt[r, j // page], j % page] for j in keys]).double()
            v = torch.stack([kv[1, bt[r, j // page], j % page] for j in keys]).double()
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [L, H, D]
            s = torch.einsum("hd,lhd->hl", q[int(qsl[r]) + i].double(), k) * scale
            if cap is not None:
                s = torch.tanh(s / cap) * cap
            out[int(qsl[r]) + i] = torch.einsum("hl,lhd->hd", s.softmax(-1), v)
    return out


WINDOW_BATCH = dict(q_lens=[5, 1, 1, 1, 16, 17, 1, 40, 20, 3],
                    seq_lens=[5, 7, 16, 17, 48, 17, 33, 41, 150, 65])


@pytest.mark.parametrize("window", [1, 5, 16, 40, 1000])
@pytest.mark.parametrize("cap", [None, 5.0])
def test_torch_reference_window_and_cap_match_definition(gen, window, cap):
    """The reference itself (decode batch and per-request prefill paths) against the definition,
    with the blocks outside every window dropped."""
    q, kv, qsl, sl, bt = paged_batch(gen, **WINDOW_BATCH, num_heads=4, num_kv_heads=2,
                                     head_dim=16, dtype=torch.float64, page=8)
    want = dense_attention(q, kv, qsl, sl, bt, 0.3, window, cap)
    kv_d, bt_d, dropped = drop_out_of_window_blocks(kv, qsl, sl, bt, window)
    assert dropped or window >= 40
    got = paged_attention_torch(q, kv_d, qsl, sl, bt_d, 0.3, sliding_window=window,
                                logits_soft_cap=cap)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


# windows below a page, equal to one, across several pages and tiles, as long as a sequence
# (33), beyond every sequence
@pytest.mark.parametrize("window", [1, 5, 16, 33, 1000])
@pytest.mark.parametrize("splits", [None, 3])
def test_decode_sliding_window(gen, window, splits):
    seq_lens = [1, 15, 16, 17, 33, 70, 130]
    q, kv, qsl, sl, bt = paged_batch(gen, [1] * len(seq_lens), seq_lens, 8, 2, 32,
                                     torch.float32)
    ref = attention_ref(q, kv, qsl, sl, bt, 0.2, sliding_window=window)
    kv, bt, _ = drop_out_of_window_blocks(kv, qsl, sl, bt, window)
    out = run_attention(q, kv, qsl, sl, bt, 0.2, max_query_len=1, num_splits=splits,
                        sliding_window=window)
    check(out, ref, torch.float32, gen, f"window={window} splits={splits}")


@pytest.mark.parametrize("window", [1, 3, 16, 40, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_prefill_decode_sliding_window(gen, window, dtype):
    """Fresh prompts, later chunks / prefix hits and decodes in one launch, each query's window
    starting mid-tile and mid-page; with the mask-free middle loop and with every tile masked."""
    q, kv, qsl, sl, bt = paged_batch(gen, **WINDOW_BATCH, num_heads=8, num_kv_heads=2,
                                     head_dim=32, dtype=dtype)
    ref = attention_ref(q, kv, qsl, sl, bt, 0.3, sliding_window=window)
    kv, bt, _ = drop_out_of_window_blocks(kv, qsl, sl, bt, window)
    for tune in (None, {"split_mask": False, "block_n": 16}, {"rows": 16, "block_n": 16}):
        out = run_attention(q, kv, qsl, sl, bt, 0.3, max_query_len=40, tune=tune,
                            sliding_window=window)
        check(out, ref, dtype, gen, f"window={window} tune={tune}")


@pytest.mark.parametrize("window", [None, 6])
def test_soft_cap(gen, window):
    q, kv, qsl, sl, bt = paged_batch(gen, **WINDOW_BATCH, num_heads=4, num_kv_heads=2,
                                     head_dim=32, dtype=torch.float32)
    q = q * 3  # scores well past the cap, so capping changes them
    ref = attention_ref(q, kv, qsl, sl, bt, 0.3, sliding_window=window, logits_soft_cap=5.0)
    assert rel_err(ref, attention_ref(q, kv, qsl, sl, bt, 0.3, sliding_window=window)) > 1e-2
    check(run_attention(q, kv, qsl, sl, bt, 0.3, sliding_window=window, logits_soft_cap=5.0),
          ref, torch.float32, gen, "prefill")
    q1 = q[qsl[1:].long() - 1].contiguous()
    qsl1 = torch.arange(len(sl) + 1, dtype=torch.int32)
    check(run_attention(q1, kv, qsl1, sl, bt, 0.3, max_query_len=1, num_splits=2,
                        sliding_window=window, logits_soft_cap=5.0),
          attention_ref(q1, kv, qsl1, sl, bt, 0.3, sliding_window=window, logits_soft_cap=5.0),
          torch.float32, gen, "decode")


# ---------------------------------------------------------------- norms

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96])
def test_rms_norm(gen, dtype, hidden):
    x = randn(gen, 7, hidden, dtype=dtype)
    w = randn(gen, hidden).to(dtype)
    check(norm.rms_norm_triton(x, w, 1e-6), rms_norm_torch(x.double(), w.double(), 1e-6),
          dtype, gen, "2-D")
    # Qwen3 q-norm: per-head norm on a strided [T, H, D] view of the fused qkv output
    qkv = randn(gen, 5, 6 * hidden, dtype=dtype)
    qv = qkv[:, :4 * hidden].view(5, 4, hidden)
    check(norm.rms_norm_triton(qv, w, 1e-6), rms_norm_torch(qv.double(), w.double(), 1e-6),
          dtype, gen, "3-D view")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_updates_residual_in_place(gen, dtype):
    x, res, w = randn(gen, 6, 80, dtype=dtype), randn(gen, 6, 80, dtype=dtype), randn(gen, 80)
    ref_out, ref_res = fused_add_rms_norm_torch(x.double(), res.double(), w.double(), 1e-5)
    res_before = res.clone()
    out, new_res = norm.fused_add_rms_norm_triton(x, res, w.to(dtype), 1e-5)
    assert new_res is res and not torch.equal(res, res_before)
    check(new_res, ref_res, dtype, gen, "residual")
    check(out, ref_out, dtype, gen, "out")


# ---------------------------------------------------------------- rotary

def cos_sin_cache(max_pos, rot_dim, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    f = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat((f.cos(), f.sin()), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot_dim", [32, 16])
def test_rotary_in_place_on_qkv_views(gen, dtype, rot_dim):
    t, hq, hk, d = 9, 4, 2, 32
    qkv = randn(gen, t, (hq + 2 * hk) * d, dtype=dtype)
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    v_before = qkv[:, (hq + hk) * d:].clone()
    cache = cos_sin_cache(100, rot_dim)
    pos = torch.randint(0, 100, (t,), generator=gen)
    ref_q, ref_k = rotary_embedding_torch(pos, q.double(), k.double(), cache.double())
    out_q, out_k = rotary.rotary_embedding_triton(pos, q, k, cache)
    assert out_q is q and out_k is k
    check(q, ref_q, dtype, gen, "q")
    check(k, ref_k, dtype, gen, "k")
    assert torch.equal(qkv[:, (hq + hk) * d:], v_before)     # v untouched



def test_rotary_reference_takes_the_step_pair_eagerly_or_lazily(gen):
    """The layer hands the torch reference a function that gathers cos/sin once per step (the
    torch backend on CUDA takes this path); it must rotate as if given the pair itself."""
    from pagoda.kernels.rotary import gather_cos_sin
    t, hq, hk, d = 7, 4, 2, 32
    q, k = randn(gen, t, hq, d), randn(gen, t, hk, d)
    cache = cos_sin_cache(64, d)
    pos = torch.randint(0, 64, (t,), generator=gen)
    plain = rotary_embedding_torch(pos, q, k, cache)
    calls = []
    lazy = rotary_embedding_torch(pos, q, k, cache,
                                  lambda: calls.append(1) or gather_cos_sin(pos, cache))
    eager = rotary_embedding_torch(pos, q, k, cache, gather_cos_sin(pos, cache))
    assert calls == [1]
    for got in (lazy, eager):
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    assert not torch.equal(plain[0], q)  # it did rotate


# ---------------------------------------------------------------- activation

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 2 * 96), (2, 3, 2 * 1500)])
def test_silu_and_mul(gen, dtype, shape):
    x = randn(gen, *shape, dtype=dtype)
    out = act.silu_and_mul_triton(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    check(out, silu_and_mul_torch(x.double()), dtype, gen)


# ---------------------------------------------------------------- dispatch

def test_dispatch_routes_cpu_tensors_to_torch(gen):
    q, kv, qsl, sl, bt = paged_batch(gen, [3, 1], [10, 5], 4, 2, 32, torch.float32)
    out = torch.full_like(q, float("nan"))
    res = dispatch.paged_attention(q, kv, qsl, sl, bt, 0.3, qsl.tolist(), sl.tolist(),
                                   max_query_len=3, out=out)
    assert res is out
    assert torch.equal(out, paged_attention_torch(q, kv, qsl, sl, bt, 0.3))
    x, res_, w = randn(gen, 3, 64), randn(gen, 3, 64), randn(gen, 64)
    a, b = dispatch.fused_add_rms_norm(x, res_, w, 1e-6)
    ra, rb = fused_add_rms_norm_torch(x, res_, w, 1e-6)
    assert torch.equal(a, ra) and torch.equal(b, rb)
    assert dispatch.use_triton(x) is False


# ---------------------------------------------------------------- sampling

def filter_ref(logits, temp, top_k, top_p, min_p):
    """The sampler's target distribution one row at a time, the obvious way (vLLM's order:
    min-p, top-k, top-p; ties at a boundary all kept)."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for i, row in enumerate(logits.double()):
        p = (row / float(temp[i])).softmax(-1)
        keep = p >= float(min_p[i]) * p.max()
        if top_k[i] > 0:
            kth = sorted(row.tolist(), reverse=True)[int(top_k[i]) - 1]
            keep &= row >= kth
        q = torch.where(keep, p, 0.0)
        q = q / q.sum()
        if top_p[i] < 1:
            better = torch.tensor([float(q[q > v].sum()) for v in q.tolist()], dtype=torch.float64)
            keep &= better < float(top_p[i])
        q = torch.where(keep, p, 0.0)
        out[i] = q / q.sum()
    return out


def test_reference_distribution_is_the_definition(gen):
    b, vocab = 7, 60
    logits = randn(gen, b, vocab) * 2
    logits[3, :10] = logits[3, 10]  # ties at the top-k / top-p boundary
    temp = torch.tensor([1.0, 0.7, 1.3, 1.0, 0.5, 1.0, 2.0])
    top_k = torch.tensor([0, 5, 0, 12, 30, 0, 8])
    top_p = torch.tensor([1.0, 1.0, 0.8, 0.5, 0.9, 0.3, 0.6])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.05])
    got = sampling.reference_probs(logits, temp, top_k, top_p, min_p)
    want = filter_ref(logits, temp, top_k, top_p, min_p)
    assert torch.equal(got > 0, want > 0), f"seed {gen.initial_seed()}"
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert ((got > 0).sum(-1) < vocab)[1:].all()


def test_row_sampler_triton_draws_what_torch_draws(gen):
    import numpy as np
    n, vocab = 6, 2500  # two chunks of the kernel
    vals = randn(gen, n, vocab) * torch.linspace(0.3, 3, n)[:, None]
    vals[2] = float("-inf")  # nothing to draw (a fully masked row): column 0
    width = torch.tensor([vocab, 40, vocab, vocab, 700, vocab])
    inv_t = torch.tensor([1.0, 1.3, 0.8, 1.0, 2.0, 1.1])
    min_p = torch.tensor([0.0, 0.0, 0.2, 0.0, 0.05, 0.0])
    top_p = torch.tensor([1.0, 0.6, 0.9, 0.2, 1.0, 0.5])
    index = torch.tensor([5, 4, 3, 2, 1, 0])
    seeds = np.array([1, 2**64 - 1, 2**63, 12345, 7, 99], dtype=np.uint64)
    same = 0
    for step in range(4):
        pos = np.arange(n, dtype=np.int64) * 77 + step
        ref = sampling.sample_rows_torch(vals, index, width, inv_t, min_p, top_p, seeds, pos)
        got = sampling_tri.sample_rows_triton(vals, index, width, inv_t, min_p, top_p,
                                              torch.from_numpy(seeds.view(np.int64)), torch.from_numpy(pos))
        same += int((got == ref).sum())
        assert (got < width).all() and got[3] == 0
    assert same >= 4 * n - 1, f"seed {gen.initial_seed()}: {same}/{4 * n}"
    bf = sampling_tri.sample_rows_triton(vals.bfloat16(), index, width, inv_t, min_p, top_p,
                                         torch.from_numpy(seeds.view(np.int64)), torch.from_numpy(pos))
    assert torch.equal(bf, sampling.sample_rows_torch(vals.bfloat16(), index, width, inv_t, min_p,
                                                      top_p, seeds, pos))


def test_penalties_triton_equal_torch(gen):
    vocab = 1500
    logits = randn(gen, 4, vocab) * 3
    state = torch.randint(0, 3, (6, vocab), generator=gen, dtype=torch.int32)
    state |= (torch.rand(6, vocab, generator=gen) < 0.2).int() * sampling.PROMPT_BIT
    brows, srows = torch.tensor([3, 1, 0]), torch.tensor([5, 0, 2])
    rep, freq, pres = torch.tensor([1.4, 0.7, 1.0]), torch.tensor([0.2, 0.0, -0.5]), torch.tensor([0.5, 1.0, 0.0])
    got, ref = logits.clone(), logits.clone()
    sampling_tri.apply_penalties_triton(got, state, brows, srows, rep, freq, pres)
    sampling.apply_penalties_torch(ref, state, brows, srows, rep, freq, pres)
    assert torch.equal(got, ref)
    assert torch.equal(got[2], logits[2]) and not torch.equal(got[3], logits[3])
