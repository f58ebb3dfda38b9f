"""Compile every Triton kernel variant the engine launches for a Hopper GPU (sm_90), on a machine
without one: the interpreter that runs the kernel tests on CPU accepts code that the compiler
refuses (e.g. returns of different dtypes in untaken constexpr branches), and a kernel that does
not compile fails every request on the GPU.

Run as a script (tests/test_triton_compiles.py starts it in a subprocess with TRITON_INTERPRET
unset): a stand-in driver reports an sm_90 target, every launch becomes a compile-only warm-up,
and each kernel wrapper is called on small CPU tensors for each variant. Prints one line per
failure and exits 1 if any.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET unset"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _Hopper:
    """Just enough of a driver for JITFunction to pick a target and compile."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


class _FrontEndDone(Exception):
    """Raised in place of the LLVM stage: the front end and the GPU layouts (TTIR, TTGIR) are
    where code the interpreter ran can be refused; LLVM, PTX and cubin would take ~10 min here.
    FULL_COMPILE=1 runs them too."""


def _stop_before_llvm(*args):
    """Triton's stage hook: called bare for a cache key, then with (backend, stages, ...)."""
    if not args:
        return "pagoda-compile-check", "to-ttgir"

    def done(src, metadata):
        raise _FrontEndDone()
    args[1]["llir"] = done


if not os.environ.get("FULL_COMPILE"):
    from triton import knobs
    knobs.runtime.add_stages_inspection_hook = _stop_before_llvm
driver.set_active(_Hopper())
FAILED: list[str] = []
COMPILED: set = set()
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup=False, **kwargs):
    key = (self.fn.__name__, tuple(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor))))
    try:
        _run(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED.add(key)
    except _FrontEndDone:
        COMPILED.add(key)
    except Exception as e:  # noqa: BLE001 - reported, and the next variant is tried
        FAILED.append(f"{self.fn.__name__} {dict(key[1])}: {type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
        if os.environ.get("VERBOSE"):
            traceback.print_exc()


JITFunction.run = _compile_only


def attention_variants(shard: int = 0, shards: int = 1) -> None:
    """shard k of n: every n-th (dtype, cache format) pair from the k-th (nearly all the time
    of the check is here, so the test splits it over two processes)."""
    from pagoda.kernels.attention_triton import paged_attention_triton, reshape_and_cache_triton
    from pagoda.layers.quantization.kv_cache import KVCacheFormat
    nb, bs, kvh, heads, d, reqs = 8, 16, 2, 8, 64, 2
    pairs = [(dt, kv) for dt in (torch.bfloat16, torch.float16, torch.float32)
             for kv in ("auto", "int8", "int4", "fp8_e4m3", "fp8_e5m2")]
    for dtype, kv in pairs[shard::shards]:
        fmt = KVCacheFormat(kv, dtype, kvh, d)
        (cache, quant), = fmt.allocate(1, nb, bs, lambda shape, dt: torch.zeros(shape, dtype=dt))
        k = torch.zeros(5, kvh, d, dtype=dtype)
        reshape_and_cache_triton(k, k.clone(), cache, torch.arange(5), quant)
        bt = torch.arange(nb, dtype=torch.int32).view(reqs, nb // reqs)
        seq = torch.tensor([20, 33], dtype=torch.int32)
        for q_lens, mql in (((1, 1), 1), ((3, 9), 9), ((3, 9), None), ((64, 1), 64)):
            qsl = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32)
            q = torch.zeros(sum(q_lens), heads, d, dtype=dtype)
            for sliding, cap in ((None, None), (16, None), (None, 30.0), (16, 50.0)):
                splits = (1, 4) if mql == 1 else (None,)
                for ns in splits:
                    paged_attention_triton(q, cache, qsl, seq, bt, 0.125, max_query_len=mql,
                                           max_seq_len=64, num_splits=ns, sliding_window=sliding,
                                           logits_soft_cap=cap, kv_quant=quant)


def layer_variants() -> None:
    from pagoda.kernels.activation_triton import silu_and_mul_triton
    from pagoda.kernels.norm_triton import fused_add_rms_norm_triton, rms_norm_triton
    from pagoda.kernels.rotary_triton import rotary_embedding_triton
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.zeros(4, 64, dtype=dtype)
        w = torch.ones(64, dtype=dtype)
        rms_norm_triton(x, w, 1e-6)
        fused_add_rms_norm_triton(x, x.clone(), w, 1e-6)
        rms_norm_triton(torch.zeros(4, 3, 32, dtype=dtype), torch.ones(32, dtype=dtype), 1e-6)  # q/k norm
        silu_and_mul_triton(torch.zeros(4, 128, dtype=dtype))
        q, k = torch.zeros(4, 8, 64, dtype=dtype), torch.zeros(4, 2, 64, dtype=dtype)
        rotary_embedding_triton(torch.arange(4), q, k, torch.zeros(32, 64, dtype=torch.float32))


def sampling_variants() -> None:
    from pagoda.kernels.sampling_triton import apply_penalties_triton, sample_rows_triton
    n, vocab = 4, 1000
    vals = torch.zeros(n, vocab, dtype=torch.float32)
    f = torch.ones(n)
    for top_p in (True, False):
        for min_p in (True, False):
            sample_rows_triton(vals, torch.arange(n), torch.full((n,), vocab), f, f, f,
                               torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64),
                               use_top_p=top_p, use_min_p=min_p)
    sample_rows_triton(vals.bfloat16(), torch.arange(n), torch.full((n,), vocab), f, f, f,
                       torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64))
    apply_penalties_triton(vals, torch.zeros(n, vocab, dtype=torch.int32), torch.arange(n),
                           torch.arange(n), f, f, f)


def logprobs_variants() -> None:
    from pagoda.kernels.logprobs_triton import logprobs_topk_triton
    for dtype in (torch.float32, torch.bfloat16):
        for k in (0, 1, 5, 20):
            logprobs_topk_triton(torch.zeros(4, 3000, dtype=dtype), torch.zeros(4, dtype=torch.long), k)


def grammar_bitmask_variants() -> None:
    from pagoda.kernels.grammar_bitmask_triton import apply_bitmask_rows_triton
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        apply_bitmask_rows_triton(torch.zeros(4, 3000, dtype=dtype), torch.zeros(2, 94, dtype=torch.int32),
                                  torch.tensor([3, 1], dtype=torch.int32), 2990)


def w4a16_variants() -> None:
    from pagoda.kernels.w4a16 import w4a16_matmul_triton
    K, N, group = 256, 128, 128
    qweight = torch.zeros(K // 8, N, dtype=torch.int32)
    scales = torch.ones(K // group, N, dtype=torch.bfloat16)
    zeros = torch.zeros(K // group, N, dtype=torch.bfloat16)
    for m in (1, 16, 48, 200):
        for split in (None, 1, 2):
            w4a16_matmul_triton(torch.zeros(m, K, dtype=torch.bfloat16), qweight, scales, zeros, group,
                                split_k=split)


PARTS = (attention_variants, layer_variants, sampling_variants, logprobs_variants, grammar_bitmask_variants,
         w4a16_variants)


def main() -> int:
    """argv: the parts to compile (function names, `attention_variants:K/N` for shard K of N;
    all when none), so the test can run two processes side by side."""
    by_name = {p.__name__: p for p in PARTS}
    chosen = []
    for spec in sys.argv[1:] or list(by_name):
        name, _, shard = spec.partition(":")
        k, n = (int(x) for x in shard.split("/")) if shard else (0, 1)
        chosen.append((by_name[name], (k, n) if shard else ()))
    for part, shard_args in chosen:
        t0 = time.time()
        try:
            part(*shard_args)
        except Exception as e:  # noqa: BLE001 - a wrapper itself broke on CPU tensors
            FAILED.append(f"{part.__name__}: {type(e).__name__}: {e}")
            traceback.print_exc()
        print(f"part {part.__name__} {time.time() - t0:.1f}s", file=sys.stderr)
    names = sorted({k[0] for k in COMPILED})
    print(f"compiled {len(COMPILED)} kernel variants for sm_90{'' if os.environ.get('FULL_COMPILE') else ' (to TTGIR)'} ({', '.join(names)})")
    for line in FAILED:
        print("FAILED", line)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
