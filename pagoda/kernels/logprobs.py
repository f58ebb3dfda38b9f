"""Logprobs of sampled (or given) tokens with the top-k alternatives, torch reference.

Per row of logits [N, V]: fp32 log-softmax; the chosen token's logprob and rank (1 + the tokens
strictly more likely), then the k most likely tokens (ids, logprobs), best first.
`pagoda.kernels.logprobs_triton` does the same in one read of each row (CUDA): this reference
makes an fp32 copy and reads it four more times (logsumexp, rank, top-k's passes)."""
from __future__ import annotations

import torch


def logprobs_topk_torch(logits: torch.Tensor, chosen: torch.Tensor, k: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids int64 [N, 1 + k'], logprobs fp32 [N, 1 + k'], ranks int64 [N]), k' = min(k, V)."""
    x = logits.float()
    lse = x.logsumexp(-1, keepdim=True)
    picked = x.gather(1, chosen[:, None])
    ranks = (x > picked).sum(-1) + 1
    ids, lps = chosen[:, None], picked - lse
    if k > 0:
        top_v, top_i = x.topk(min(k, x.shape[1]), dim=-1)
        ids, lps = torch.cat([ids, top_i], 1), torch.cat([lps, top_v - lse], 1)
    return ids, lps, ranks
