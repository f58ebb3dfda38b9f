"""GPU check and timings of the Triton kernels against their torch references, at model sizes.

    python benchmarks/gpu_kernels.py [--out DIR] [--sweep] [--budget-s 300]

For each case: relative error norm of the Triton output against the reference run in higher
precision (fp32 for bf16 inputs, float64 for fp32 inputs), a NaN check on a poisoned output,
and median times (triton.testing.do_bench, L2 flushed between runs) of the Triton kernel and
of the torch reference. Decode attention also reports bytes moved (K/V of every context read
once, q read, out written) against the device-to-device copy ceiling measured in the same run.
Shapes: Qwen3-0.6B (16 q heads, 8 KV heads, head_dim 128), Llama-3-8B (32/8/128) and a
Llama-2-7B-like MHA (32/32/128) for GQA ratio 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

DRY = os.environ.get("PAGODA_BENCH_DRY") == "1"  # CPU smoke test of this script: tiny sizes
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagoda.kernels import attention_triton as at  # noqa: E402
from pagoda.kernels.activation import silu_and_mul_torch  # noqa: E402
from pagoda.kernels.activation_triton import silu_and_mul_triton  # noqa: E402
from pagoda.kernels.attention import paged_attention_torch, reshape_and_cache_torch  # noqa: E402
from pagoda.kernels.norm import fused_add_rms_norm_torch, rms_norm_torch  # noqa: E402
from pagoda.kernels.norm_triton import fused_add_rms_norm_triton, rms_norm_triton  # noqa: E402
from pagoda.kernels.rotary import rotary_embedding_torch  # noqa: E402
from pagoda.kernels.rotary_triton import rotary_embedding_triton  # noqa: E402
from pagoda.kernels.sampling import PROMPT_BIT, apply_penalties_torch, sample_rows_torch  # noqa: E402
from pagoda.kernels.sampling_triton import apply_penalties_triton, sample_rows_triton  # noqa: E402

DEV = "cpu" if DRY else "cuda"
BUDGET_S = 300.0
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
SHAPES = {"qwen3-0.6b": (16, 8, 128), "llama3-8b": (32, 8, 128), "mha-32": (32, 32, 128)}
ROWS: list[dict] = []
T0 = time.time()


def log(*a):
    print(*a, flush=True)


def n(x: int) -> int:
    """A size; divided by 64 in the dry run."""
    return max(1, x // 64) if DRY else x


def sync():
    if not DRY:
        torch.cuda.synchronize()


def ms(fn) -> float:
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def hi(t: torch.Tensor) -> torch.Tensor:
    """Reference precision for inputs of t's dtype."""
    return t.double() if t.dtype == torch.float32 else t.float()


def record(name, dtype, err, nan, t_tri, t_ref, nbytes=None, flops=None, extra=None):
    row = dict(case=name, dtype=str(dtype).replace("torch.", ""), rel_err=err, nan=nan,
               ok=(not nan) and err <= TOL[dtype], triton_ms=t_tri, torch_ms=t_ref,
               speedup=t_ref / t_tri if t_tri and t_ref else None)
    if nbytes:
        row["GB/s"] = nbytes / t_tri / 1e6
    if flops:
        row["TFLOP/s"] = flops / t_tri / 1e9
    row.update(extra or {})
    ROWS.append(row)
    log(json.dumps(row))


# ---------------------------------------------------------------- ceilings

def copy_ceiling() -> float:
    x = torch.randn(n(256 * 2**20), device=DEV)  # 1 GiB
    y = torch.empty_like(x)
    t = ms(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / t / 1e6  # GB/s, read + write


def matmul_ceiling() -> float:
    m = n(8192)
    a = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    return 2 * m**3 / ms(lambda: a @ b) / 1e9


# ---------------------------------------------------------------- paged batches

def paged_batch(q_lens, seq_lens, heads, kv_heads, dim, dtype, page=16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    blocks = [(s + page - 1) // page for s in seq_lens]
    nb = sum(blocks) + 8
    kv = torch.randn(2, nb, page, kv_heads, dim, device=DEV, generator=g).to(dtype)
    perm = torch.randperm(nb, device=DEV, generator=g)
    bt = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=DEV)
    starts = torch.tensor([0] + blocks).cumsum(0).tolist()
    for r, n in enumerate(blocks):
        bt[r, :n] = perm[starts[r]:starts[r] + n]
        tail = seq_lens[r] % page
        if tail:  # slots past the end hold NaN: reading them would show
            kv[:, bt[r, n - 1], tail:] = float("nan")
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32,
                       device=DEV)
    q = torch.randn(int(sum(q_lens)), heads, dim, device=DEV, generator=g).to(dtype)
    return q, kv, qsl, torch.tensor(seq_lens, dtype=torch.int32, device=DEV), bt


def ragged(n, lo, hi_, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi_ + 1, (n,), generator=g).tolist()


def attention_case(name, q_lens, seq_lens, shape, dtype, *, time_ref=True, tune=None,
                   num_splits=None, quiet=False):
    if time.time() - T0 > BUDGET_S:
        raise TimeoutError("over the time budget")
    if DRY:  # three requests, lengths / 64
        q_lens = [1 if ql == 1 else max(2, ql // 64) for ql in q_lens[:3]]
        seq_lens = [max(ql, s // 64) for ql, s in zip(q_lens, seq_lens)]
    h, kvh, d = SHAPES[shape]
    q, kv, qsl, sl, bt = paged_batch(q_lens, seq_lens, h, kvh, d, dtype)
    scale = d ** -0.5
    mql = max(q_lens)
    out = torch.full_like(q, float("nan"))
    qsl_l, sl_l = qsl.tolist(), sl.tolist()

    def tri():
        return at.paged_attention_triton(q, kv, qsl, sl, bt, scale, max_query_len=mql,
                                         max_seq_len=max(seq_lens), out=out, tune=tune,
                                         num_splits=num_splits)

    tri()
    sync()
    nan = bool(out.isnan().any())
    err = float("nan")
    if not quiet:
        ref = paged_attention_torch(hi(q), hi(kv), qsl, sl, bt, scale, qsl_l, sl_l)
        err = rel_err(out, ref)
        del ref
    t_tri = ms(tri)
    t_ref = ms(lambda: paged_attention_torch(q, kv, qsl, sl, bt, scale, qsl_l, sl_l)) \
        if time_ref else None
    el = q.element_size()
    kv_bytes = sum(seq_lens) * kvh * d * 2 * el
    nbytes = kv_bytes + 2 * q.numel() * el
    flops = 4 * h * d * sum(ql * (s - ql + (ql + 1) / 2) for s, ql in zip(seq_lens, q_lens))
    extra = {"shape": shape, "tune": tune, "splits": num_splits}
    if mql == 1:
        extra["%copy"] = 100 * nbytes / t_tri / 1e6 / CEIL["copy"]
    if not quiet:
        record(name, dtype, err, nan, t_tri, t_ref, nbytes=nbytes, flops=flops, extra=extra)
    del q, kv
    if not DRY:
        torch.cuda.empty_cache()
    return t_tri


def flash_baseline(q_len, shape):
    """SDPA causal on dense tensors (no paging): what a fused flash kernel does at this size."""
    h, kvh, d = SHAPES[shape]
    q_len = n(q_len)
    q = torch.randn(1, h, q_len, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, h, q_len, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, h, q_len, d, device=DEV, dtype=torch.bfloat16)
    t = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    flops = 4 * h * d * q_len * (q_len + 1) / 2
    log(json.dumps({"case": f"flash-sdpa dense causal {q_len} {shape}", "ms": t,
                    "TFLOP/s": flops / t / 1e9}))
    ROWS.append({"case": f"sdpa-flash dense {q_len}", "shape": shape, "dtype": "bfloat16",
                 "triton_ms": None, "torch_ms": t, "TFLOP/s": flops / t / 1e9, "ok": True})


# ---------------------------------------------------------------- other kernels

def elementwise_cases(dtype):
    g = torch.Generator(device=DEV).manual_seed(1)

    def rnd(*s):
        return torch.randn(*s, device=DEV, generator=g).to(dtype)

    el = torch.tensor([], dtype=dtype).element_size()
    for rows, hid in ((256, 1024), (2048, 1024), (2048, 4096)):
        rows = n(rows)
        x, w = rnd(rows, hid), rnd(hid)
        out = rms_norm_triton(x, w, 1e-6)
        record(f"rms_norm {rows}x{hid}", dtype, rel_err(out, rms_norm_torch(hi(x), hi(w), 1e-6)),
               bool(out.isnan().any()), ms(lambda: rms_norm_triton(x, w, 1e-6)),
               ms(lambda: rms_norm_torch(x, w, 1e-6)), nbytes=2 * x.numel() * el)
        r = rnd(rows, hid)
        ref_o, ref_r = fused_add_rms_norm_torch(hi(x), hi(r), hi(w), 1e-6)
        o, r2 = fused_add_rms_norm_triton(x, r, w, 1e-6)
        err = max(rel_err(o, ref_o), rel_err(r2, ref_r))
        record(f"fused_add_rms_norm {rows}x{hid}", dtype, err, bool(o.isnan().any()),
               ms(lambda: fused_add_rms_norm_triton(x, r, w, 1e-6)),
               ms(lambda: fused_add_rms_norm_torch(x, r, w, 1e-6)), nbytes=4 * x.numel() * el)
    # Qwen3 per-head q-norm on a strided view of qkv
    qkv = rnd(n(2048), (16 + 16) * 128)
    qv, w = qkv[:, :2048].view(n(2048), 16, 128), rnd(128)
    out = rms_norm_triton(qv, w, 1e-6)
    record("rms_norm per-head view 2048x16x128", dtype,
           rel_err(out, rms_norm_torch(hi(qv), hi(w), 1e-6)), bool(out.isnan().any()),
           ms(lambda: rms_norm_triton(qv, w, 1e-6)), ms(lambda: rms_norm_torch(qv, w, 1e-6)),
           nbytes=2 * qv.numel() * el)
    # rotary on views of qkv, Llama-3-8B heads
    t, hq, hk, d = n(2048), 32, 8, 128
    qkv = rnd(t, (hq + 2 * hk) * d)
    q, k = qkv[:, :hq * d].view(t, hq, d), qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    inv = 1.0 / 500000.0 ** (torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d)
    f = torch.arange(8192, device=DEV, dtype=torch.float32)[:, None] * inv
    cache = torch.cat((f.cos(), f.sin()), -1)
    pos = torch.randint(0, 8192, (t,), device=DEV, generator=g)
    rq, rk = rotary_embedding_torch(pos, hi(q), hi(k), hi(cache))
    rotary_embedding_triton(pos, q, k, cache)
    record("rotary 2048 tok 32q/8k x128 (in place)", dtype, max(rel_err(q, rq), rel_err(k, rk)),
           bool(q.isnan().any() or k.isnan().any()),
           ms(lambda: rotary_embedding_triton(pos, q, k, cache)),
           ms(lambda: rotary_embedding_torch(pos, q, k, cache)),
           nbytes=2 * (q.numel() + k.numel()) * el)
    for rows, inter in ((2048, 3072), (2048, 14336), (256, 14336)):
        rows = n(rows)
        x = rnd(rows, 2 * inter)
        out = silu_and_mul_triton(x)
        record(f"silu_and_mul {rows}x{inter}", dtype, rel_err(out, silu_and_mul_torch(hi(x))),
               bool(out.isnan().any()), ms(lambda: silu_and_mul_triton(x)),
               ms(lambda: silu_and_mul_torch(x)), nbytes=3 * rows * inter * el)
    # KV write, 2048 tokens of Llama-3-8B K/V as views of qkv
    nb, page = 4096, 16
    kc = torch.full((2, nb, page, hk, d), float("nan"), device=DEV, dtype=dtype)
    ref = kc.clone()
    kk, vv = k, qkv[:, (hq + hk) * d:].view(t, hk, d)
    slots = torch.randperm(nb * page, device=DEV, generator=g)[:t]
    slots[::17] = -1
    at.reshape_and_cache_triton(kk, vv, kc, slots)
    reshape_and_cache_torch(kk, vv, ref, slots)
    same = torch.equal(kc.nan_to_num(), ref.nan_to_num()) and torch.equal(kc.isnan(), ref.isnan())
    record("reshape_and_cache 2048 tok 8x128", dtype, 0.0 if same else 1.0, False,
           ms(lambda: at.reshape_and_cache_triton(kk, vv, kc, slots)),
           ms(lambda: reshape_and_cache_torch(kk, vv, ref, slots)),
           nbytes=2 * 2 * kk.numel() * el)


def sampling_cases():
    """The row sampler (top-p 0.95 at temperature 0.8, read straight from bf16 logits; top-k 50
    candidates) and the fused penalties against their torch twins, with the full sort of the
    vocabulary that the old sampler paid for, for scale."""
    import numpy as np
    b, vocab = (16 if DRY else 512), (4096 if DRY else 151936)
    g = torch.Generator(device=DEV).manual_seed(2)
    logits = (torch.randn(b, vocab, device=DEV, generator=g) * 2).to(torch.bfloat16)
    idx = torch.arange(b, device=DEV)
    width = torch.full((b,), vocab, device=DEV)
    inv_t = torch.full((b,), 1 / 0.8, device=DEV)
    min_p, top_p = torch.zeros(b, device=DEV), torch.full((b,), 0.95, device=DEV)
    seed_h, pos_h = np.arange(b, dtype=np.uint64) * 7919, np.arange(b, dtype=np.int64) + 11
    seed, pos = torch.from_numpy(seed_h.view(np.int64)).to(DEV), torch.from_numpy(pos_h).to(DEV)
    got = sample_rows_triton(logits, idx, width, inv_t, min_p, top_p, seed, pos)
    m = min(b, 16)
    ref = sample_rows_torch(logits[:m].cpu(), idx[:m].cpu(), width[:m].cpu(), inv_t[:m].cpu(),
                            min_p[:m].cpu(), top_p[:m].cpu(), seed_h[:m], pos_h[:m])
    agree = float((got[:m].cpu() == ref).float().mean())
    topv, topi = logits.topk(50, dim=-1)
    k50 = torch.full((b,), 50, device=DEV)
    state = torch.randint(0, 3, (b, vocab), device=DEV, generator=g, dtype=torch.int32)
    state |= (torch.rand(b, vocab, device=DEV, generator=g) < 0.01).int() * PROMPT_BIT
    rep, freq, pres = (torch.full((b,), v, device=DEV) for v in (1.1, 0.3, 0.2))
    x = logits.float()
    y, yr = x.clone(), x.clone()
    apply_penalties_triton(y, state, idx, idx, rep, freq, pres)
    apply_penalties_torch(yr, state, idx, idx, rep, freq, pres)
    pen_err = rel_err(y, yr)
    row = {"case": f"sampling B={b} V={vocab}", "row_sampler_equals_torch_twin": agree,
           "penalties_rel_err": pen_err, "ok": agree >= 0.9 and pen_err < 1e-6,
           "greedy argmax ms": ms(lambda: logits.argmax(-1)),
           "top-p 0.95 row sampler ms": ms(lambda: sample_rows_triton(
               logits, idx, width, inv_t, min_p, top_p, seed, pos)),
           "top-k 50 topk ms": ms(lambda: logits.topk(50, dim=-1)),
           "top-k 50 + top-p row sampler ms": ms(lambda: sample_rows_triton(
               topv, idx, k50, inv_t, min_p, top_p, seed, pos)),
           "penalties triton ms": ms(lambda: apply_penalties_triton(x, state, idx, idx, rep, freq, pres)),
           "penalties torch ms": ms(lambda: apply_penalties_torch(x, state, idx, idx, rep, freq, pres)),
           "full sort fp32 ms (old top-p)": ms(lambda: x.sort(dim=-1, descending=True))}
    ROWS.append(row)
    log(json.dumps(row))


# ---------------------------------------------------------------- CUDA graphs

def graph_decode(shape, b, ctx, dtype, num_splits=None, tune=None, check=True):
    """Decode attention captured in a CUDA graph over several input sets (so K/V stream from
    HBM, not L2); after capture one set's q, K/V and lengths change in place and the replay must
    still match the reference. Returns microseconds per decode-attention call."""
    h, kvh, d = SHAPES[shape]
    if DRY:
        b, ctx = min(b, 2), max(1, ctx // 64)
    el = torch.tensor([], dtype=dtype).element_size()
    per_set = b * ctx * kvh * d * 2 * el
    nsets = 1 if DRY else int(min(16, max(1, -(-150e6 // per_set))))
    sets = [paged_batch([1] * b, [ctx] * b, h, kvh, d, dtype, seed=i) for i in range(nsets)]
    outs = [torch.full_like(st[0], float("nan")) for st in sets]
    scale = d ** -0.5

    def step():
        for (q, kv, qsl, sl, bt), o in zip(sets, outs):
            at.paged_attention_triton(q, kv, qsl, sl, bt, scale, max_query_len=1, out=o,
                                      num_splits=num_splits, tune=tune)
    if DRY:
        step()
        return 0.0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    err, nan = 0.0, False
    if check:
        q, kv, qsl, sl, bt = sets[0]
        q.normal_()
        kv.view(-1)[: kv.numel() // 2].normal_()  # K changes, V keeps its poisoned tails
        sl.copy_(torch.randint(1, ctx + 1, (b,), device=DEV))
        outs[0].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        nan = bool(outs[0].isnan().any())
        err = rel_err(outs[0], paged_attention_torch(hi(q), hi(kv), qsl, sl, bt, scale))
        sl.fill_(ctx)
    graph.replay()
    times = []
    for _ in range(20):
        a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        z.record()
        z.synchronize()
        times.append(a.elapsed_time(z))
    us = sorted(times)[len(times) // 2] / nsets * 1e3
    if check:
        nbytes = per_set + 2 * b * h * d * el
        row = dict(case=f"graph decode B={b} ctx{ctx}", shape=shape,
                   dtype=str(dtype).replace("torch.", ""), rel_err=err, nan=nan,
                   ok=(not nan) and err <= TOL[dtype], triton_ms=us / 1e3, torch_ms=None,
                   speedup=None, **{"GB/s": nbytes / us / 1e3,
                                    "%copy": 100 * nbytes / us / 1e3 / CEIL["copy"]},
                   splits=num_splits, sets=nsets)
        ROWS.append(row)
        log(json.dumps(row))
    del sets, outs, graph
    return us


def graph_cases():
    for shape, b, ctx in (("llama3-8b", 1, 512), ("llama3-8b", 1, 4096), ("llama3-8b", 8, 4096),
                          ("llama3-8b", 64, 1024), ("llama3-8b", 256, 1024),
                          ("qwen3-0.6b", 1, 1024), ("qwen3-0.6b", 1, 4096),
                          ("qwen3-0.6b", 64, 1024)):
        graph_decode(shape, b, ctx, torch.bfloat16)
    graph_decode("llama3-8b", 4, 1024, torch.float32)


# ---------------------------------------------------------------- sweep

def sweep():
    """Split-K choice for small decode batches (graph replay timings), then prefill variants
    (each checked against the reference)."""
    for b, ctx in ((1, 1024), (1, 4096), (4, 4096), (16, 2048), (64, 512)):
        res = {}
        for bn in (64, 128):
            for splits in (1, 2, 4, 8, 16, 32):
                if time.time() - T0 > BUDGET_S:
                    raise TimeoutError("over the time budget")
                res[(bn, splits)] = graph_decode("llama3-8b", b, ctx, torch.bfloat16,
                                                 num_splits=splits,
                                                 tune=dict(block_n=bn, num_warps=4, num_stages=2),
                                                 check=False)
        auto = at.decode_num_splits(b, 8, ctx, 8 if DRY else torch.cuda.get_device_properties(0)
                                    .multi_processor_count)
        best = min(res, key=res.get)
        line = {"case": f"sweep splits llama3 B={b} ctx{ctx}", "auto_splits": auto,
                "best (block_n, splits)": best, "best_us": res[best],
                "us": {f"{k[0]}/{k[1]}": round(v, 1) for k, v in res.items()}, "ok": True}
        ROWS.append(line)
        log(json.dumps(line))
    for dtype, variants in (
            (torch.bfloat16, [dict(rows=r, block_n=bn, num_warps=w, num_stages=st, split_mask=sm)
                              for r, bn, w, st in ((64, 64, 4, 2), (128, 64, 8, 2),
                                                   (128, 128, 8, 2), (64, 128, 4, 2),
                                                   (128, 64, 4, 3), (64, 64, 4, 3))
                              for sm in (True, False)]),
            (torch.float32, [dict(prec=p, rows=r, block_n=bn, num_warps=w)
                             for p in ("tf32x3", "ieee")
                             for r, bn, w in ((64, 32, 4), (32, 32, 4), (64, 64, 8))])):
        for shape, ql, sl in (("llama3-8b", [2048], [3072]), ("qwen3-0.6b", [2048], [2048])):
            h, kvh, d = SHAPES[shape]
            if DRY:
                ql, sl = [ql[0] // 64], [sl[0] // 64]
            q, kv, qsl, sls, bt = paged_batch(ql, sl, h, kvh, d, dtype)
            ref = paged_attention_torch(hi(q), hi(kv), qsl, sls, bt, d ** -0.5)
            flops = 4 * h * d * sum(a * (s_ - a + (a + 1) / 2) for s_, a in zip(sl, ql))
            for tune in variants:
                if time.time() - T0 > BUDGET_S:
                    raise TimeoutError("over the time budget")
                out = torch.full_like(q, float("nan"))

                def run():
                    at.paged_attention_triton(q, kv, qsl, sls, bt, d ** -0.5,
                                              max_query_len=max(ql), out=out, tune=tune)
                try:
                    run()
                    t = ms(run)
                except Exception as e:  # noqa: BLE001 - a variant may not compile
                    log("sweep", shape, tune, "failed", repr(e)[:200])
                    continue
                err = rel_err(out, ref)
                line = {"case": f"sweep prefill {shape} q{ql[0]} kv{sl[0]}",
                        "dtype": str(dtype).replace("torch.", ""), "tune": tune,
                        "ms": t, "TFLOP/s": flops / t / 1e9, "err": err,
                        "ok": err <= TOL[dtype] and not out.isnan().any().item()}
                ROWS.append(line)
                log(json.dumps(line, default=str))
            del q, kv, ref


def attention_cases(dtype):
    for shape in ("qwen3-0.6b", "llama3-8b"):
        for b in (64, 256):
            attention_case(f"decode B={b} ctx512-1024", [1] * b, ragged(b, 512, 1024, b), shape,
                           dtype)
        attention_case("decode B=1 ctx4096 (split-K)", [1], [4096], shape, dtype)
        attention_case("decode B=8 ctx 15..8193", [1] * 8,
                       [15, 16, 17, 511, 1024, 2049, 4095, 8193], shape, dtype)
        attention_case("prefill 2048 fresh", [2048], [2048], shape, dtype)
        attention_case("prefill chunk 2048, prefix 1024", [2048], [3072], shape, dtype)
        attention_case("mixed 1x1024 chunk(prefix 512) + 63 decodes", [1024] + [1] * 63,
                       [1536] + ragged(63, 512, 1024, 7), shape, dtype)
        attention_case("16 prompts x 128", [128] * 16, [128] * 16, shape, dtype)
    attention_case("decode B=64 ctx512-1024 (GQA 1)", [1] * 64, ragged(64, 512, 1024, 5),
                   "mha-32", dtype)


def table():
    cols = ["case", "shape", "dtype", "ok", "rel_err", "triton_ms", "torch_ms", "speedup",
            "GB/s", "%copy", "TFLOP/s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in ROWS:
        if "rel_err" not in r:
            continue

        def f(c):
            v = r.get(c)
            if isinstance(v, float):
                return f"{v:.2e}" if c == "rel_err" else (f"{v * 1e3:.1f}us" if c.endswith("ms")
                                                          and v < 1 else f"{v:.3g}")
            return "" if v is None else str(v)
        lines.append("| " + " | ".join(f(c) for c in cols) + " |")
    return "\n".join(lines)


CEIL: dict[str, float] = {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--budget-s", type=float, default=300)
    args = ap.parse_args()
    global BUDGET_S
    BUDGET_S = args.budget_s
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = "cpu (dry run)" if DRY else torch.cuda.get_device_name()
    sms = 0 if DRY else torch.cuda.get_device_properties(0).multi_processor_count
    log(f"torch {torch.__version__} triton {triton.__version__} {gpu} SMs={sms}")
    CEIL["copy"] = copy_ceiling()
    CEIL["bf16 matmul TFLOP/s"] = matmul_ceiling()
    log("ceilings", CEIL)
    sections = [("attention bf16", lambda: attention_cases(torch.bfloat16)),
                ("elementwise bf16", lambda: elementwise_cases(torch.bfloat16)),
                ("flash baseline", lambda: [flash_baseline(2048, s) for s in SHAPES
                                            if s != "mha-32"]),
                ("sampling", sampling_cases),
                ("cuda graphs", graph_cases),
                ("attention fp32", lambda: attention_cases(torch.float32)),
                ("elementwise fp32", lambda: elementwise_cases(torch.float32))]
    if args.sweep:
        sections.insert(6, ("sweep", sweep))
    for name, fn in sections:
        if time.time() - T0 > args.budget_s:
            log(f"SKIPPED {name}: over budget")
            ROWS.append({"case": f"SKIPPED {name}", "ok": False})
            continue
        log(f"== {name} ({time.time() - T0:.0f}s)")
        try:
            fn()
        except Exception:  # noqa: BLE001 - keep the other sections
            log(traceback.format_exc())
            ROWS.append({"case": f"FAILED {name}", "ok": False})
    with open(os.path.join(args.out, "gpu_kernels.json"), "w") as fh:
        json.dump({"ceilings": CEIL, "rows": ROWS, "torch": torch.__version__,
                   "triton": triton.__version__, "gpu": gpu}, fh,
                  indent=1, default=str)
    tbl = table()
    with open(os.path.join(args.out, "gpu_kernels.md"), "w") as fh:
        fh.write(tbl + "\n")
    log(f"ceilings: {CEIL}")
    log(tbl)
    bad = [r["case"] for r in ROWS if not r.get("ok")]
    log(f"total {time.time() - T0:.0f}s; failing: {bad or 'none'}")


if __name__ == "__main__":
    main()
