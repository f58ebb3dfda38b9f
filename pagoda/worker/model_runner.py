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
from pagoda.engine.request import PENDING
from pagoda.worker.sampler import SampleResult, Sampler, prompt_logprobs_rows, to_device

logger = logging.getLogger("pagoda.model_runner")


@dataclass
class StepResult:
    sampled: list[int]                              # one new token per seq of PendingStep.seqs
    logprobs: dict[Sequence, tuple]                 # seq -> (lp, rank, top-k list)
    prompt_logprobs: dict[Sequence, list[tuple]]    # seq -> rows for the prompt positions computed


def _logprobs_by_seq(seqs: list[Sequence], res: SampleResult) -> dict:
    """The sampler's logprob rows keyed by sequence (only sequences that asked for them)."""
    if res.logprobs is None:
        return {}
    return {seq: row for seq, row in zip(seqs, res.logprobs) if row is not None}


class PendingStep:
    """A launched step: its sampled ids are being copied into pinned host memory behind the GPU
    work; result() waits for that copy only (the step's event), not for later launches."""

    def __init__(self, seqs: list[Sequence], host: Optional[torch.Tensor], event, logprobs: dict,
                 prompt_logprobs: dict):
        self.seqs = seqs              # sequences that sampled a token, in row order
        self.host = host              # int64 [len(seqs)] pinned (CUDA) or the tokens themselves (CPU)
        self.event = event
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs

    def result(self) -> StepResult:
        if self.event is not None:
            self.event.synchronize()
        sampled = self.host.tolist() if self.seqs else []
        return StepResult(sampled, self.logprobs, self.prompt_logprobs)


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
        self.cpu_decoder = None  # worker.cpu_decode.CpuDecoder: decode steps in one C call a layer
        self.last_step_graph = False
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_out: dict[int, torch.Tensor] = {}
        self.on_cuda = device.type == "cuda"
        # the previous launch's sampled ids (device): the next step's PENDING inputs come from here
        self.prev_tokens: Optional[torch.Tensor] = None
        # pinned landing buffers for sampled ids, two in turn: buffer k is rewritten at step k+2,
        # and the engine has read step k's ids back before it launches step k+2
        self._out_bufs: list[torch.Tensor] = []
        self._launches = 0

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
        self.cpu_decoder = None
        if self.device.type == "cpu" and self.dtype == torch.float32 and num_blocks:
            from pagoda.worker.cpu_decode import CpuDecoder
            self.cpu_decoder = CpuDecoder.build(self.model)

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
        self._alloc_host_buffers(max_bs)
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

    def _alloc_host_buffers(self, max_bs: int) -> None:
        """Pinned staging for decode inputs, two sets used in turn: while step k+1 is prepared,
        step k's host-to-device copies may still be queued behind step k-1 on the GPU. The
        numpy views let the host fill them from Python lists without a torch op per write."""
        pin = self.on_cuda
        def buf(*shape, dtype=torch.long):
            t = torch.zeros(*shape, dtype=dtype)
            return t.pin_memory() if pin else t
        # rows: input ids, positions, slots, seq lens, placeholder rows, their source rows
        self.io_host = [buf(6, max_bs) for _ in range(2)]
        # block-table rows change only when a sequence gains a block or the batch reshuffles:
        # each set mirrors them and rewrites only the rows that changed since its last use
        self.bt_host = [buf(max_bs, self.max_blocks, dtype=torch.int32) for _ in range(2)]
        self.io_np = [t.numpy() for t in self.io_host]
        self.bt_np = [t.numpy() for t in self.bt_host]
        self.bt_rows: list[list] = [[None] * max_bs for _ in range(2)]

    def _replay_decode(self, seqs: list[Sequence]) -> torch.Tensor:
        n = len(seqs)
        bs = next(b for b in self.graph_sizes if b >= n)
        bsz = self.block_size
        which = self._launches & 1
        ids, pos, slots, dst, src = [], [], [], [], []
        bt, rows = self.bt_np[which], self.bt_rows[which]
        width = 0
        for i, s in enumerate(seqs):
            toks = s.token_ids
            p = len(toks) - 1
            t = toks[p]
            if t == PENDING:
                dst.append(i)
                src.append(s.sample_row)
            ids.append(t)
            pos.append(p)
            b = s.block_ids
            slots.append(b[p // bsz] * bsz + p % bsz)
            # block tables: rewrite only the rows that changed since this buffer set was used
            nb = len(b)
            if nb > width:
                width = nb
            key = (s.seq_id, nb)
            if rows[i] != key:
                bt[i, :nb] = b
                rows[i] = key
        io = self.io_np[which]
        io[0, :n] = ids
        io[1, :n] = pos
        io[2, :n] = slots
        io[3, :n] = io[1, :n] + 1
        m = len(dst)
        if m:
            io[4, :m] = dst
            io[5, :m] = src
        dev_io = self.io_host[which][:, :max(n, m)].to(self.device, non_blocking=True)
        self.g_ids[:n].copy_(dev_io[0, :n])
        if m:  # inputs still on the device from the previous step
            self.g_ids[dev_io[4, :m]] = self.prev_tokens[dev_io[5, :m]]
        self.g_pos[:n].copy_(dev_io[1, :n])
        self.g_slots[:n].copy_(dev_io[2, :n])
        self.g_seq_lens[:n].copy_(dev_io[3, :n])
        self.g_bt[:n, :width].copy_(self.bt_host[which][:n, :width], non_blocking=True)
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
            if n != 1 or seq.num_computed_tokens != len(seq.token_ids) - 1 or seq.needs_prompt_logprobs:
                return False
        return True

    def _finish_launch(self, sample_seqs: list[Sequence], tokens: Optional[torch.Tensor],
                       logprobs: dict, prompt_logprobs: dict) -> PendingStep:
        """Start the sampled ids' copy to the host; remember them for the next step's inputs."""
        self._launches += 1
        if not sample_seqs:
            return PendingStep([], None, None, logprobs, prompt_logprobs)
        for i, seq in enumerate(sample_seqs):
            seq.sample_row = i
        self.prev_tokens = tokens
        if not self.on_cuda:
            return PendingStep(sample_seqs, tokens, None, logprobs, prompt_logprobs)
        n = len(sample_seqs)
        k = self._launches & 1
        if len(self._out_bufs) < 2 or self._out_bufs[k].numel() < n:
            size = max(n, 256)
            self._out_bufs = [torch.empty(size, dtype=torch.long).pin_memory() for _ in range(2)]
        host = self._out_bufs[k][:n]
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingStep(sample_seqs, host, event, logprobs, prompt_logprobs)

    # -- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> PendingStep:
        """Queue one step on the device and return without waiting for it. A sequence whose last
        token is PENDING (sampled by the previous launch, not read back yet) takes its input id
        from that launch's device tensor."""
        self.last_step_graph = self._can_replay(sched)
        if self.last_step_graph:
            seqs = list(sched.num_tokens)
            h = self._replay_decode(seqs)
            res = self.sampler(self.model.compute_logits(h), seqs)
            return self._finish_launch(seqs, res.token_ids, _logprobs_by_seq(seqs, res), {})
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        logit_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        pend_dst: list[int] = []
        pend_src: list[int] = []
        plp: list[tuple[Sequence, int, int, int]] = []  # seq, first row, n rows, first position
        seqs = list(sched.num_tokens)
        for seq in seqs:
            n = sched.num_tokens[seq]
            start = seq.num_computed_tokens
            end = start + n
            row0 = qsl[-1]
            new = seq.token_ids[start:end]
            if new[-1] == PENDING:  # only ever the last token: one decode step behind
                pend_dst.append(row0 + n - 1)
                pend_src.append(seq.sample_row)
            input_ids.extend(new)
            positions.extend(range(start, end))
            bids = seq.block_ids
            slots.extend(bids[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(row0 + n)
            seq_lens.append(end)
            if seq.needs_prompt_logprobs and start < seq.prompt_len:
                # rows whose next token is still a prompt token
                m = min(end, seq.prompt_len - 1) - start
                if m > 0:
                    plp.append((seq, len(logit_rows), m, start))
                    logit_rows.extend(range(row0, row0 + m))
            if end == len(seq.token_ids):  # prompt fully computed: sample the next token
                sample_seqs.append(seq)
                logit_rows.append(row0 + n - 1)
        max_blocks = max(len(s.block_ids) for s in seqs)
        bt = [s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in seqs]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=to_device(slots, torch.long, dev),
            query_start_loc=to_device(qsl, torch.int32, dev),
            seq_lens=to_device(seq_lens, torch.int32, dev),
            block_tables=to_device(bt, torch.int32, dev),
            max_query_len=max(qsl[i + 1] - qsl[i] for i in range(len(seqs))),
            max_seq_len=max(seq_lens), query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
        ids = to_device(input_ids, torch.long, dev)
        if pend_dst:
            ids[to_device(pend_dst, torch.long, dev)] = self.prev_tokens[to_device(pend_src, torch.long, dev)]
        set_attention_metadata(meta)
        try:
            pos = to_device(positions, torch.long, dev)
            if self.cpu_decoder is not None and meta.max_query_len == 1:
                h = self.cpu_decoder(ids, pos, meta)
            else:
                h = self.model(ids, pos)
        finally:
            set_attention_metadata(None)
        if not logit_rows:
            return self._finish_launch([], None, {}, {})
        logits = self.model.compute_logits(h[to_device(logit_rows, torch.long, dev)])
        prompt_lps = {}
        for seq, r0, m, p0 in plp:
            next_ids = seq.token_ids[p0 + 1:p0 + 1 + m]
            prompt_lps[seq] = prompt_logprobs_rows(logits[r0:r0 + m], next_ids,
                                                   seq.request.params.prompt_logprobs)
        if not sample_seqs:
            return self._finish_launch([], None, {}, prompt_lps)
        sl = logits
        if plp:  # sampling rows are the ones not claimed by prompt logprobs
            taken = {r0 + j for _, r0, m, _ in plp for j in range(m)}
            sl = logits[to_device([i for i in range(len(logit_rows)) if i not in taken], torch.long, dev)]
        res: SampleResult = self.sampler(sl, sample_seqs)
        return self._finish_launch(sample_seqs, res.token_ids, _logprobs_by_seq(sample_seqs, res),
                                   prompt_lps)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        """One step, waiting for its sampled ids (the non-overlapped path)."""
        return self.launch(sched).result()
