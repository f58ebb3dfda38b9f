"""Decode steps replayed from CUDA graphs.

One decode step per batch size of a ladder (1, 2, 4, 8, 16, 32, 48, ...) is recorded into a
CUDA graph, all sharing one memory pool, largest first. A decode step of n requests replays the
smallest graph >= n on persistent input buffers, padded with rows that write nowhere (slot -1)
and read one cached position; host launch cost drops to one replay per step.

The inputs go through pinned staging buffers, two sets used in turn: while step k+1 is
prepared, step k's host-to-device copies may still be queued behind step k-1 on the GPU.
With `capture=False` the same buffers and padding run the model eagerly (how the staging is
tested on the CPU).
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import torch

from pagoda.layers.attention import AttentionMetadata, set_attention_metadata

logger = logging.getLogger("pagoda.cuda_graphs")


def batch_size_ladder(max_bs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16)) + [max_bs]
    return sorted(set(sizes))


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, max_num_seqs: int,
                 max_model_len: int, block_size: int, capture: bool = True):
        self.model = model
        self.device = device
        self.max_bs = min(max_num_seqs, 512)
        self.sizes = batch_size_ladder(self.max_bs)
        self.max_blocks = -(-max_model_len // block_size)
        self.capture_graphs = capture
        dev, max_bs = device, self.max_bs
        self.ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.pos = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.slots = torch.full((max_bs,), -1, dtype=torch.long, device=dev)
        self.qsl = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.bt = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=dev)
        pin = device.type == "cuda"

        def buf(*shape, dtype=torch.long):
            t = torch.zeros(*shape, dtype=dtype)
            return t.pin_memory() if pin else t
        # rows: input ids, positions, slots, seq lens, placeholder rows, their source rows
        self.io_host = [buf(6, max_bs) for _ in range(2)]
        self.bt_host = [buf(max_bs, self.max_blocks, dtype=torch.int32) for _ in range(2)]
        self.io_np = [t.numpy() for t in self.io_host]
        self.bt_np = [t.numpy() for t in self.bt_host]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._turn = 0

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(self.slots[:bs], self.qsl[:bs + 1], self.seq_lens[:bs], self.bt[:bs],
                                 max_query_len=1, max_seq_len=None)

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.capture_graphs:
            return
        pool = None
        t0 = time.time()
        for bs in reversed(self.sizes):
            set_attention_metadata(self._meta(bs))
            try:
                self.model(self.ids[:bs], self.pos[:bs])  # warm-up: JIT compiles outside capture
                torch.cuda.synchronize(self.device)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    out = self.model(self.ids[:bs], self.pos[:bs])
            finally:
                set_attention_metadata(None)
            if pool is None:
                pool = g.pool()
            self.graphs[bs] = g
            self.outputs[bs] = out
        torch.cuda.synchronize(self.device)
        logger.info("captured %d CUDA graphs (decode batch 1..%d) in %.1fs", len(self.sizes),
                    self.max_bs, time.time() - t0)

    def can_run(self, num_reqs: int) -> bool:
        return num_reqs <= self.max_bs and (bool(self.graphs) or not self.capture_graphs)

    @torch.inference_mode()
    def run(self, ids: np.ndarray, pos: np.ndarray, slots: np.ndarray, block_rows: np.ndarray,
            pend_dst: np.ndarray, pend_src: np.ndarray,
            prev_tokens: Optional[torch.Tensor], rope_pos: Optional[np.ndarray] = None) -> torch.Tensor:
        """One decode step of n = len(ids) requests -> hidden states [n, hidden]. Rows in
        pend_dst take their input id from prev_tokens[pend_src] (sampled by the step before,
        still on the device). block_rows: [n, width] block tables. rope_pos: the rotary
        positions where they differ from pos (past an M-RoPE prompt: position + delta)."""
        n = len(ids)
        bs = next(b for b in self.sizes if b >= n)
        which = self._turn & 1
        self._turn += 1
        io = self.io_np[which]
        io[0, :n] = ids
        io[1, :n] = pos if rope_pos is None else rope_pos  # what the model reads: rotary only
        io[2, :n] = slots
        io[3, :n] = pos + 1
        m = len(pend_dst)
        if m:
            io[4, :m] = pend_dst
            io[5, :m] = pend_src
        width = block_rows.shape[1]
        self.bt_np[which][:n, :width] = block_rows
        dev_io = self.io_host[which][:, :max(n, m)].to(self.device, non_blocking=True)
        self.ids[:n].copy_(dev_io[0, :n])
        if m:  # inputs still on the device from the previous step
            self.ids[dev_io[4, :m]] = prev_tokens[dev_io[5, :m]]
        self.pos[:n].copy_(dev_io[1, :n])
        self.slots[:n].copy_(dev_io[2, :n])
        self.seq_lens[:n].copy_(dev_io[3, :n])
        self.bt[:n, :width].copy_(self.bt_host[which][:n, :width], non_blocking=True)
        if bs > n:  # padding rows: write nowhere, attend to one position of block 0
            self.slots[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
            self.bt[n:bs, 0].fill_(0)
        if self.capture_graphs:
            self.graphs[bs].replay()
            return self.outputs[bs][:n]
        set_attention_metadata(self._meta(bs))
        try:
            return self.model(self.ids[:bs], self.pos[:bs])[:n]
        finally:
            set_attention_metadata(None)
