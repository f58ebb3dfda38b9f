"""Continuous batching under one token budget.

Each step decides {sequence: number of new tokens to compute}. Running sequences go first (a
decode costs one token; an unfinished prompt continues its chunked prefill), then waiting ones are
admitted while the budget, --max-num-seqs and free KV blocks allow. Prefill and decode mix freely in
one step; a prompt longer than the remaining budget is prefilled in chunks over several steps.
When a running sequence needs a block and none is free, the newest running sequence is preempted:
its blocks are freed and it goes back to the front of the queue, to be recomputed later (its full
blocks usually survive in the prefix cache). Nothing is ever dropped.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pagoda.engine.block_manager import BlockManager
from pagoda.engine.request import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    # insertion-ordered: the model runner lays the batch out in this order
    num_tokens: dict[Sequence, int] = field(default_factory=dict)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens.values())

    def __bool__(self):
        return bool(self.num_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.bm.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        bsz = self.bm.block_size
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_tokens = len(seq.token_ids)
            if seq.num_pending and num_tokens - seq.prompt_len >= seq.params.max_tokens:
                i += 1  # its last token is in flight: it finishes when that is resolved
                continue
            n = min(num_tokens - seq.num_computed_tokens, budget)
            end = seq.num_computed_tokens + n
            if n == 1 and end <= len(seq.block_ids) * bsz and end % bsz:
                # common decode step: the token fits in the last block, which is not yet full
                out.num_tokens[seq] = 1
                budget -= 1
                i += 1
                continue
            while not self.bm.allocate(seq, n):
                victim = self.running.pop()  # the newest
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.num_tokens[seq] = n
                budget -= n
                i += 1
        if out.preempted:  # memory is short: admit nothing new this step
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # prompt logprobs need logits for every prompt position: no prefix reuse for them
            cached = [] if seq.needs_prompt_logprobs else self.bm.find_cached_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens - len(cached) * self.bm.block_size, budget)
            if not self.bm.allocate(seq, n, cached):
                break
            self.waiting.popleft()
            if cached and seq.num_preemptions == 0:
                m = seq.request.metrics
                m.num_cached_tokens = max(m.num_cached_tokens, len(cached) * self.bm.block_size)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.num_tokens[seq] = n
            budget -= n
        return out

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.bm.free_seq(seq)
