"""4-bit weights, 16-bit activations (W4A16), the one format that --quantization int4 (online,
round-to-nearest from a float checkpoint) and AWQ / GPTQ checkpoints (awq.py, gptq.py) become:
codes with a scale and an integer zero per group of K, run by kernels/w4a16.py (Triton on CUDA,
dequantize + matmul in torch elsewhere).

GPTQ's act-order (desc_act) assigns each input column to a group through g_idx; sorting K by
group once at load makes the groups contiguous, and the layer then permutes its input columns
the same way (`perm`) before the matmul.
"""
from __future__ import annotations

from typing import Optional

import torch

from pagoda.kernels import w4a16

GROUP = 128  # --quantization int4's group size


def rtn(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest of weight [N, K] in groups of `group` along K:
    (codes [K, N] uint8, scales [K / group, N], zeros [K / group, N] as codes) with
    W ~ (code - zero) * scale."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)  # 0 stays exactly representable
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    zero = torch.round(-lo / scale).clamp(0, 15)
    codes = torch.round(w / scale[..., None] + zero[..., None]).clamp(0, 15)
    return (codes.reshape(n, k).T.to(torch.uint8).contiguous(), scale.T.contiguous(),
            zero.T.contiguous())


class Int4LinearMethod:
    """codes [K, N] (0..15), scales / zeros [K / group, N]; perm: the input-column order the codes'
    rows follow (None: as is)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                 bias: Optional[torch.Tensor], dtype: torch.dtype,
                 perm: Optional[torch.Tensor] = None):
        k, self.out_features = codes.shape
        if k % group or k % 2:
            raise ValueError(f"--quantization: {k} input features do not split into 4-bit groups "
                             f"of {group}")
        self.group = group
        self.qweight = w4a16.pack_codes(codes)
        self.scales = scales.to(dtype).contiguous()
        self.zeros = zeros.to(dtype).contiguous()
        self.bias = bias
        self.perm = perm
        self.triton = codes.is_cuda and w4a16.HAS_TRITON

    def dequantize(self) -> torch.Tensor:
        """The weight as floats [N, K] in the original column order (tests, references)."""
        wt = w4a16.dequantize_torch(self.qweight, self.scales, self.zeros, self.group)
        if self.perm is not None:
            wt = wt[torch.argsort(self.perm)]
        return wt.T

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        fn = w4a16.w4a16_matmul_triton if self.triton else w4a16.w4a16_matmul_torch
        y = fn(x2.contiguous(), self.qweight, self.scales, self.zeros, self.group, self.bias)
        return y.reshape(*shape[:-1], self.out_features)


def from_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                g_idx: Optional[torch.Tensor], group: int, bias, dtype) -> Int4LinearMethod:
    """A layer from codes [K, N] whose row k belongs to group g_idx[k] (None: k // group)."""
    k = codes.shape[0]
    perm = None
    if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(k) // group):
        perm = torch.argsort(g_idx.long(), stable=True).to(codes.device)
        codes = codes[perm]
        counts = torch.bincount(g_idx.long().cpu(), minlength=scales.shape[0])
        if not bool((counts == group).all()):
            raise ValueError("--quantization gptq: g_idx does not put group_size columns in each group")
    return Int4LinearMethod(codes, scales, zeros, group, bias, dtype, perm)
