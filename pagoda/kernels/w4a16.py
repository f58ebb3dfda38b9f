"""W4A16 matmul: y = x @ W.T with W held as 4-bit codes in groups along K, dequantized as
W[n, k] = (code[k, n] - zero[g(k), n]) * scale[g(k), n] with g(k) = k // group (the layout AWQ,
GPTQ and --quantization int4 all become; GPTQ's act-order g_idx is undone by permuting K once
at load, see layers/quantization/int4.py).

Layout: qweight uint8 [K / 2, N] (row j: code of k = 2j in the low nibble, 2j + 1 in the high),
scales and zeros [K / group, N] in the activation dtype (zeros are codes, 0..15, kept as floats).

The Triton kernel dequantizes a [BLOCK_K, BLOCK_N] tile of W in registers and feeds tl.dot;
the weight crosses memory as 4-bit codes. For the few rows of a decode step it splits K over
programs (split-K) so that enough of them stream the weight, summing with atomic adds in fp32.
The torch reference dequantizes the whole weight and calls matmul.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes [K, N] (0..15) -> uint8 [K / 2, N] (even k in the low nibble)."""
    c = codes.to(torch.uint8)
    return (c[0::2] | (c[1::2] << 4)).contiguous()


def unpack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [K / 2, N] -> codes [K, N] as uint8."""
    return torch.stack([qweight & 15, qweight >> 4], 1).flatten(0, 1)


def dequantize_torch(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group: int) -> torch.Tensor:
    """W.T as floats [K, N] in scales' dtype."""
    codes = unpack_codes(qweight).to(scales.dtype)
    g = torch.arange(codes.shape[0], device=codes.device) // group
    return (codes - zeros[g]) * scales[g]


def w4a16_matmul_torch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor, group: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ dequantize_torch(qweight, scales, zeros, group).to(x.dtype)
    return y + bias if bias is not None else y


if HAS_TRITON:
    @triton.jit
    def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST: tl.constexpr):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_tiles = tl.cdiv(K, BLOCK_K)
        per = tl.cdiv(k_tiles, SPLIT_K)
        for t in range(pid_k * per, tl.minimum(pid_k * per + per, k_tiles)):
            rk = t * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w_ok = k_ok[:, None] & n_ok[None, :]
            byte = tl.load(qw_ptr + (rk // 2)[:, None] * N + rn[None, :], mask=w_ok, other=0)
            code = ((byte.to(tl.int32) >> ((rk % 2) * 4)[:, None]) & 15).to(tl.float32)
            g = (rk // GROUP)[:, None] * N + rn[None, :]
            sc = tl.load(s_ptr + g, mask=w_ok, other=0.0).to(tl.float32)
            zr = tl.load(z_ptr + g, mask=w_ok, other=0.0).to(tl.float32)
            w = (code - zr) * sc
            if UPCAST:  # the interpreter's tl.dot on bf16 is wrong (see attention_triton.py)
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        o_ptr = out_ptr + rm[:, None] * stride_om + rn[None, :]
        o_ok = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            tl.store(o_ptr, acc.to(out_ptr.dtype.element_ty), mask=o_ok)
        else:
            tl.atomic_add(o_ptr, acc, mask=o_ok)


def _split_k(m: int, n: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """Programs along K for small M: aim at ~2 per SM, keeping >= 4 K tiles each."""
    if m > 64:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    tiles_n, tiles_k = -(-n // block_n), -(-k // block_k)
    want = max(1, (2 * sms) // max(tiles_n, 1))
    return max(1, min(want, tiles_k // 4, 16))


def w4a16_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor, group: int, bias: torch.Tensor | None = None,
                        split_k: int | None = None) -> torch.Tensor:
    """Same contract as w4a16_matmul_torch; x [M, K] row-major (last dim dense)."""
    M, K = x.shape
    N = qweight.shape[1]
    assert x.stride(1) == 1 and qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n, block_k = (64, 64) if M <= 64 else (128, 64)
    if split_k is None:
        split_k = _split_k(M, N, K, block_n, block_k, x.device)
    if split_k > 1:
        out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    _w4a16_kernel[grid](x, qweight, scales, zeros, out, M, N, K, x.stride(0), out.stride(0),
                        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                        SPLIT_K=split_k, UPCAST=_INTERPRET, num_warps=4, num_stages=3)
    out = out.to(x.dtype)
    return out + bias if bias is not None else out
