"""Turns one scheduled step into tensors, runs the model, samples.

One step is one flattened batch: the new tokens of every scheduled sequence back to back, with
their positions, the cache slot each new K/V goes to, per-sequence block tables, query start
offsets and KV lengths. Logits are computed only for rows that need them (the last token of each
sequence that finished its prompt, plus every prompt row of requests asking for prompt logprobs).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch

from pagoda.engine.request import Sequence
from pagoda.engine.scheduler import SchedulerOutput
from pagoda.layers.attention import AttentionMetadata, set_attention_metadata
from pagoda.worker import kv_cache as kvc
from pagoda.worker.sampler import SampleResult, Sampler, prompt_logprobs_rows

logger = logging.getLogger("pagoda.model_runner")


@dataclass
class StepResult:
    sampled: dict[Sequence, int]                    # seq -> new token
    logprobs: dict[Sequence, tuple]                 # seq -> (lp, rank, top-k list)
    prompt_logprobs: dict[Sequence, list[tuple]]    # seq -> rows for the prompt positions computed


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config, device: torch.device, dtype: torch.dtype,
                 block_size: int, seed: int = 0):
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.sampler = Sampler(config.vocab_size, seed, device)
        attn = model.attention_layers()
        self.num_layers = len(attn)
        self.num_kv_heads = attn[0].num_kv_heads
        self.head_dim = attn[0].head_dim
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.last_step_graph = False
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_out: dict[int, torch.Tensor] = {}

    # -- KV cache -------------------------------------------------------------------------------
    def block_bytes(self) -> int:
        return kvc.bytes_per_block(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim,
                                   self.dtype)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = kvc.allocate_kv_cache(self.num_layers, num_blocks, self.block_size,
                                               self.num_kv_heads, self.head_dim, self.dtype, self.device)
        for layer, cache in zip(self.model.attention_layers(), self.kv_caches):
            layer.kv_cache = cache
        self.num_blocks = num_blocks

    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int, max_model_len: int, max_num_seqs: int) -> int:
        """Peak CUDA memory of one max-size step (prefill of num_tokens tokens, logits for up to
        max_num_seqs rows), run against a throwaway cache just big enough for it."""
        per_seq = min(num_tokens, max_model_len)
        nseq = -(-num_tokens // per_seq)
        blocks_per_seq = -(-per_seq // self.block_size)
        self.allocate_kv_cache(nseq * blocks_per_seq)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.randint(0, self.config.vocab_size, (num_tokens,), device=self.device)
        lens = [min(per_seq, num_tokens - i * per_seq) for i in range(nseq)]
        qsl = [0]
        for n in lens:
            qsl.append(qsl[-1] + n)
        pos = torch.cat([torch.arange(n, device=self.device) for n in lens])
        bt = torch.arange(nseq * blocks_per_seq, dtype=torch.int32, device=self.device).view(nseq, -1)
        slots = torch.cat([i * blocks_per_seq * self.block_size + torch.arange(n, device=self.device)
                           for i, n in enumerate(lens)])
        meta = AttentionMetadata(slots, torch.tensor(qsl, dtype=torch.int32, device=self.device),
                                 torch.tensor(lens, dtype=torch.int32, device=self.device), bt,
                                 max(lens), max(lens), qsl, lens)
        set_attention_metadata(meta)
        h = self.model(ids, pos)
        rows = torch.arange(min(max_num_seqs, num_tokens), device=self.device)
        logits = self.model.compute_logits(h[rows]).float()
        torch.softmax(logits, dim=-1)
        torch.cuda.synchronize()
        set_attention_metadata(None)
        peak = torch.cuda.max_memory_allocated(self.device)
        del h, logits
        self.kv_caches = []
        for layer in self.model.attention_layers():
            layer.kv_cache = torch.empty(0)
        torch.cuda.empty_cache()
        return peak

    # -- CUDA graphs for decode -------------------------------------------------------------------
    @torch.inference_mode()
    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Record one decode step per batch size of a ladder (1, 2, 4, 8, 16, 32, 48, ...) into
        CUDA graphs sharing one memory pool, largest first. A decode step of n sequences replays
        the smallest graph >= n on persistent input buffers, padded with rows that write nowhere
        (slot -1) and read one cached position; host launch cost drops to one replay per step."""
        max_bs = min(max_num_seqs, 512)
        sizes = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16)) + [max_bs]
        sizes = sorted(set(sizes))
        dev = self.device
        self.max_blocks = -(-max_model_len // self.block_size)
        self.g_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_pos = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_slots = torch.full((max_bs,), -1, dtype=torch.long, device=dev)
        self.g_qsl = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.g_seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.g_bt = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=dev)
        self.bt_host = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32).pin_memory()
        self.bt_rows: list = [None] * max_bs
        self.io_host = torch.zeros(4, max_bs, dtype=torch.long).pin_memory()
        pool = None
        t0 = time.time()
        for bs in reversed(sizes):
            meta = AttentionMetadata(self.g_slots[:bs], self.g_qsl[:bs + 1], self.g_seq_lens[:bs],
                                     self.g_bt[:bs], max_query_len=1, max_seq_len=None)
            set_attention_metadata(meta)
            try:
                self.model(self.g_ids[:bs], self.g_pos[:bs])  # warm-up: JIT compiles outside capture
                torch.cuda.synchronize(dev)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    out = self.model(self.g_ids[:bs], self.g_pos[:bs])
            finally:
                set_attention_metadata(None)
            if pool is None:
                pool = g.pool()
            self.graphs[bs] = g
            self.graph_out[bs] = out
        torch.cuda.synchronize(dev)
        self.graph_sizes = sizes
        logger.info("captured %d CUDA graphs (decode batch 1..%d) in %.1fs", len(sizes), max_bs,
                    time.time() - t0)

    def _replay_decode(self, seqs: list[Sequence]) -> torch.Tensor:
        n = len(seqs)
        bs = next(b for b in self.graph_sizes if b >= n)
        bsz = self.block_size
        ids, pos, slots, lens = [], [], [], []
        for s in seqs:
            p = s.num_tokens - 1
            ids.append(s.token_ids[p])
            pos.append(p)
            slots.append(s.block_ids[p // bsz] * bsz + p % bsz)
            lens.append(p + 1)
        width = max(len(s.block_ids) for s in seqs)
        # block-table rows change only when a sequence gains a block or the batch reshuffles:
        # keep them in a pinned host mirror and rewrite just the rows that changed
        bt = self.bt_host
        for i, s in enumerate(seqs):
            key = (s.seq_id, len(s.block_ids))
            if self.bt_rows[i] != key:
                bt[i, :len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
                self.bt_rows[i] = key
        host = self.io_host
        host[0, :n] = torch.tensor(ids, dtype=torch.long)
        host[1, :n] = torch.tensor(pos, dtype=torch.long)
        host[2, :n] = torch.tensor(slots, dtype=torch.long)
        host[3, :n] = torch.tensor(lens, dtype=torch.long)
        dev_io = host[:, :n].to(self.device, non_blocking=True)
        self.g_ids[:n].copy_(dev_io[0])
        self.g_pos[:n].copy_(dev_io[1])
        self.g_slots[:n].copy_(dev_io[2])
        self.g_seq_lens[:n].copy_(dev_io[3])
        self.g_bt[:n, :width].copy_(bt[:n, :width], non_blocking=True)
        if bs > n:  # padding rows: write nowhere, attend to one position of block 0
            self.g_slots[n:bs].fill_(-1)
            self.g_seq_lens[n:bs].fill_(1)
            self.g_bt[n:bs, 0].fill_(0)
        self.graphs[bs].replay()
        return self.graph_out[bs][:n]

    def _can_replay(self, sched: SchedulerOutput) -> bool:
        if not self.graphs or len(sched.num_tokens) > self.graph_sizes[-1]:
            return False
        for seq, n in sched.num_tokens.items():
            if n != 1 or seq.num_computed_tokens != seq.num_tokens - 1 or seq.needs_prompt_logprobs:
                return False
        return True

    # -- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        self.last_step_graph = self._can_replay(sched)
        if self.last_step_graph:
            seqs = list(sched.num_tokens)
            h = self._replay_decode(seqs)
            result = StepResult({}, {}, {})
            res = self.sampler(self.model.compute_logits(h), seqs)
            for i, seq in enumerate(seqs):
                result.sampled[seq] = res.token_ids[i]
                if res.logprobs is not None and res.logprobs[i] is not None:
                    result.logprobs[seq] = res.logprobs[i]
            return result
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        logit_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        plp: list[tuple[Sequence, int, int, int]] = []  # seq, first row, n rows, first position
        seqs = list(sched.num_tokens)
        for seq in seqs:
            n = sched.num_tokens[seq]
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            bids = seq.block_ids
            slots.extend(bids[p // bs] * bs + p % bs for p in range(start, end))
            row0 = qsl[-1]
            qsl.append(row0 + n)
            seq_lens.append(end)
            if seq.needs_prompt_logprobs and start < seq.prompt_len:
                # rows whose next token is still a prompt token
                m = min(end, seq.prompt_len - 1) - start
                if m > 0:
                    plp.append((seq, len(logit_rows), m, start))
                    logit_rows.extend(range(row0, row0 + m))
            if end == seq.num_tokens:  # prompt fully computed: sample the next token
                sample_seqs.append(seq)
                logit_rows.append(row0 + n - 1)
        max_blocks = max(len(s.block_ids) for s in seqs)
        bt = [s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in seqs]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(bt, dtype=torch.int32, device=dev),
            max_query_len=max(qsl[i + 1] - qsl[i] for i in range(len(seqs))),
            max_seq_len=max(seq_lens), query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
        set_attention_metadata(meta)
        try:
            h = self.model(torch.tensor(input_ids, dtype=torch.long, device=dev),
                           torch.tensor(positions, dtype=torch.long, device=dev))
        finally:
            set_attention_metadata(None)
        result = StepResult({}, {}, {})
        if not logit_rows:
            return result
        logits = self.model.compute_logits(h[torch.tensor(logit_rows, device=dev)])
        for seq, r0, m, p0 in plp:
            next_ids = seq.token_ids[p0 + 1:p0 + 1 + m]
            result.prompt_logprobs[seq] = prompt_logprobs_rows(logits[r0:r0 + m], next_ids,
                                                               seq.request.params.prompt_logprobs)
        if sample_seqs:
            sample_rows = [i for i in range(len(logit_rows))]
            if plp:  # sampling rows are the ones not claimed by prompt logprobs
                taken = {r0 + j for _, r0, m, _ in plp for j in range(m)}
                sample_rows = [i for i in sample_rows if i not in taken]
            sl = logits if not plp else logits[torch.tensor(sample_rows, device=dev)]
            res: SampleResult = self.sampler(sl, sample_seqs)
            for i, seq in enumerate(sample_seqs):
                result.sampled[seq] = res.token_ids[i]
                if res.logprobs is not None and res.logprobs[i] is not None:
                    result.logprobs[seq] = res.logprobs[i]
        return result
