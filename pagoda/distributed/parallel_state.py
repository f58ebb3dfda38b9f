"""The tensor-parallel group of this process: who it is (rank of world), and the collectives
the parallel layers call (all-reduce after a row-parallel matmul, all-gather of vocab-parallel
logits). One group per worker process, set up once by the worker: torch.distributed with NCCL
on GPUs and gloo on the CPU, rendezvous at --master-addr:--master-port across --nnodes hosts.
With one rank (the default) nothing is initialized and the collectives are no-ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ParallelConfig:
    world_size: int = 1       # tensor-parallel ranks in all
    rank: int = 0             # this process's rank in the group
    local_rank: int = 0       # rank on this host (which GPU)
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: str = "gloo"


_TP: Optional[ParallelConfig] = None


def init_tensor_parallel(cfg: ParallelConfig) -> None:
    """Join the group (blocks until every rank has); a no-op for one rank."""
    global _TP
    if _TP is not None and _TP != cfg:
        destroy_tensor_parallel()  # an earlier engine's group in this process
    _TP = cfg
    if cfg.world_size == 1:
        return
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(cfg.backend, init_method=f"tcp://{cfg.master_addr}:{cfg.master_port}",
                                rank=cfg.rank, world_size=cfg.world_size)


def destroy_tensor_parallel() -> None:
    global _TP
    if _TP is not None and _TP.world_size > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    _TP = None


def tp_rank() -> int:
    return _TP.rank if _TP is not None else 0


def tp_size() -> int:
    return _TP.world_size if _TP is not None else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place (row-parallel layers' partial sums)."""
    if tp_size() == 1:
        return x
    import torch.distributed as dist
    dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along the last dimension (vocab-parallel logits)."""
    n = tp_size()
    if n == 1:
        return x
    import torch.distributed as dist
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def all_reduce_min(value: int) -> int:
    """The smallest of an integer over the ranks (e.g. the KV blocks every rank can hold)."""
    if tp_size() == 1:
        return value
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.int64)
    if _TP.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
