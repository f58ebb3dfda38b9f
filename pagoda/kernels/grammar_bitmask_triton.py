"""Triton twin of pagoda.kernels.grammar_bitmask: program (j, b) masks block b of logits row
rows[j] with bitmask row j. Every size is a runtime argument (no specialization on them), so the
start-up warm-up's one launch per logits dtype compiles every variant serving uses."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.triton_args import aligned

BLOCK = 4096


@triton.jit(do_not_specialize=["logits_stride", "mask_stride", "grammar_vocab", "vocab"])
def _bitmask_rows_kernel(logits_ptr, logits_stride, mask_ptr, mask_stride, rows_ptr, grammar_vocab, vocab,
                         BLOCK: tl.constexpr):
    j = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(rows_ptr + j).to(tl.int64)
    known = offs < grammar_vocab
    words = tl.load(mask_ptr + j.to(tl.int64) * mask_stride + offs // 32, mask=known, other=0)
    allowed = ((words >> (offs % 32)) & 1) != 0
    tl.store(logits_ptr + row * logits_stride + offs, float("-inf"), mask=(offs < vocab) & ~allowed)


def apply_bitmask_rows_triton(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor,
                              grammar_vocab: int) -> torch.Tensor:
    """As apply_bitmask_rows_reference; logits [N, V] (last dim dense), bitmask int32 [k, W]
    and rows int [k] on the logits' device."""
    k, vocab = int(rows.shape[0]), logits.shape[1]
    if k == 0:
        return logits
    assert logits.stride(1) == 1 and bitmask.dtype == torch.int32
    grammar_vocab = min(grammar_vocab, vocab, bitmask.shape[1] * 32)
    mask = aligned(bitmask)
    _bitmask_rows_kernel[(k, triton.cdiv(vocab, BLOCK))](
        logits, logits.stride(0), mask, mask.stride(0), aligned(rows, torch.int32), grammar_vocab, vocab,
        BLOCK=BLOCK, num_warps=8)
    return logits
