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
from pagoda.kernels.sampling import apply_top_k_top_p_min_p, exponential_noise, sample  # noqa: E402


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

def filter_ref(logits, top_k, top_p, min_p):
    """One row at a time, the obvious way."""
    out = torch.full_like(logits, float("-inf"))
    for i, row in enumerate(logits):
        keep = torch.ones_like(row, dtype=torch.bool)
        if top_k[i] > 0:
            keep[:] = False
            keep[torch.topk(row, int(top_k[i])).indices] = True
        masked = row.masked_fill(~keep, float("-inf"))
        if top_p[i] < 1:
            p = masked.softmax(-1)
            order = torch.argsort(p, descending=True)
            cum, kept = 0.0, torch.zeros_like(keep)
            for j in order.tolist():
                if cum >= top_p[i]:
                    break
                kept[j] = True
                cum += float(p[j])
            masked = masked.masked_fill(~kept, float("-inf"))
        if min_p[i] > 0:
            p = masked.softmax(-1)
            masked = masked.masked_fill(p < min_p[i] * p.max(), float("-inf"))
        out[i] = masked
    return out


@pytest.mark.parametrize("candidates", [0, 8], ids=["full-sort", "8-candidates"])
def test_top_k_top_p_min_p_match_row_reference(gen, candidates):
    # with 8 candidates: rows 1, 2, 5 are decided among them, row 6 (k=20) and row 7 (a nearly
    # flat row, top_p 0.99) must fall back to the full sort, rows 3 and 4 depend on the draw
    b, vocab = 8, 50
    logits = randn(gen, b, vocab) * 3
    logits[7] /= 30
    top_k = torch.tensor([0, 1, 5, 0, 50, 7, 20, 0])
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.3, 1.0, 1.0, 0.99])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.0, 0.0])
    got = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p, candidates=candidates)
    want = filter_ref(logits, top_k, top_p, min_p)
    assert torch.equal(got, want), f"seed {gen.initial_seed()}"
    assert (got[3] > float("-inf")).sum() < vocab  # top-p really removed something
    assert (got[6] > float("-inf")).sum() == 20 and (got[7] > float("-inf")).sum() > 8
    k_only = apply_top_k_top_p_min_p(logits, top_k=top_k, candidates=candidates)
    assert torch.equal(k_only, filter_ref(logits, top_k, torch.ones(b), torch.zeros(b)))


def test_top_p_one_keeps_the_whole_tail(gen):
    # peaked rows: the fp32 running sum hits 1.0 long before the last, tiny, probabilities
    logits = randn(gen, 2, 1000) * 40
    got = apply_top_k_top_p_min_p(logits, torch.zeros(2, dtype=torch.long), torch.ones(2))
    assert torch.equal(got, logits)


def test_sample_equals_row_reference_with_same_noise(gen):
    b, vocab = 5, 40
    logits = randn(gen, b, vocab) * 2
    temp = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.5])
    top_k = torch.tensor([0, 0, 10, 3, 0])
    top_p = torch.tensor([1.0, 0.8, 1.0, 1.0, 0.6])
    noise = torch.empty(b, vocab).exponential_(generator=gen)
    got = sample(logits, temp, top_k, top_p, noise=noise)
    scaled = logits / torch.where(temp == 0, 1.0, temp)[:, None]
    probs = filter_ref(scaled, top_k, top_p, torch.zeros(b)).softmax(-1)
    want = (probs / noise).argmax(-1)
    want[0] = logits[0].argmax()
    assert torch.equal(got, want), f"seed {gen.initial_seed()}"
    assert torch.equal(sample(logits, temp, all_greedy=True), logits.argmax(-1))


def test_sample_frequencies_follow_the_distribution(gen):
    vocab, n = 6, 20000
    logits = randn(gen, 1, vocab).expand(n, vocab).contiguous()
    temp = torch.full((n,), 0.8)
    top_k = torch.full((n,), 4)
    noise = torch.empty(n, vocab).exponential_(generator=gen)
    tokens = sample(logits, temp, top_k=top_k, noise=noise)
    want = apply_top_k_top_p_min_p(logits[:1] / 0.8, top_k[:1]).softmax(-1)[0]
    freq = torch.bincount(tokens, minlength=vocab).float() / n
    assert (freq - want).abs().max() < 0.02, (freq, want)
    assert freq[want == 0].sum() == 0


def test_seeded_rows_repeat(gen):
    logits = randn(gen, 3, 30)
    temp = torch.ones(3)

    def draw():
        gens = {1: torch.Generator().manual_seed(7)}
        return sample(logits, temp, noise=exponential_noise((3, 30), logits.device, gens))

    assert all(draw()[1] == draw()[1] for _ in range(5))
    noise = exponential_noise((3, 30), logits.device, {1: torch.Generator().manual_seed(7)})
    assert torch.equal(noise[1], torch.empty(30).exponential_(
        generator=torch.Generator().manual_seed(7)))
