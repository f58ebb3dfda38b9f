"""The one-pass Triton logprobs kernel (CUDA) against its torch reference, under the Triton
interpreter on the CPU: chosen token logprob and rank, top-k ids and logprobs, over rows longer
than one chunk, in fp32 and bf16, for k = 0, 1, 5 and 20; ties go to the lower token id."""
from __future__ import annotations

import pytest
import torch

from pagoda.kernels.logprobs import logprobs_topk_torch
from pagoda.kernels.logprobs_triton import BLOCK, logprobs_topk_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_matches_reference(dtype, k):
    g = torch.Generator().manual_seed(k)
    n, vocab = 5, BLOCK + 907  # two chunks, the second partial
    logits = (torch.randn(n, vocab, generator=g) * 3).to(dtype)
    chosen = torch.randint(0, vocab, (n,), generator=g)
    chosen[0] = logits[0].float().argmax()  # rank 1
    ids, lps, ranks = logprobs_topk_triton(logits, chosen, k)
    rid, rlp, rrk = logprobs_topk_torch(logits, chosen, k)
    assert torch.equal(ranks, rrk) and ranks[0] == 1
    assert torch.equal(ids[:, 0], chosen)
    if dtype == torch.float32:  # distinct values: the same ids in the same order
        assert torch.equal(ids, rid)
    else:  # bf16 has ties: the same values at each position
        assert torch.equal(logits.float().gather(1, ids), logits.float().gather(1, rid))
    assert torch.allclose(lps, rlp, atol=1e-5, rtol=0)


def test_ties_go_to_the_lower_id_and_vocab_smaller_than_k():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, 2.0]])
    ids, lps, ranks = logprobs_topk_triton(logits, torch.tensor([2]), 4)
    assert ids.tolist() == [[2, 1, 2, 4, 5]]
    assert ranks.tolist() == [1]
    ref = torch.log_softmax(logits, -1)[0]
    assert torch.allclose(lps[0], ref[[2, 1, 2, 4, 5]], atol=1e-6)
    ids, _, _ = logprobs_topk_triton(logits, torch.tensor([3]), 10)  # k > vocab: all of it
    assert ids.tolist() == [[3, 1, 2, 4, 5, 0, 3]]
