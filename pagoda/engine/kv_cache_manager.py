"""KV-cache blocks of the engine core: ref counts, a free list, and automatic prefix caching.

A full block is identified by a hash chained over every token before and in it, so two sequences
that share a prefix share that prefix's blocks. A block whose ref count drops to zero keeps its
hash and contents and goes to the back of the free queue; it is reused by a later request that
asks for the same prefix, or evicted (least recently freed first) when a fresh block is needed.
Token ids are stored and compared on a hit, so a hash collision can never return wrong KV.
A block that covers image placeholders also keys on those images' content hashes: two prompts
with the same text around different images share no KV past the first image.
Blocks are ids only: the worker owns the tensors they index.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from pagoda.engine.request import Request


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: Optional[int] = None
        self.token_ids: Optional[tuple[int, ...]] = None


def chain_hash(prev: Optional[int], token_ids: tuple) -> int:
    return hash((prev, token_ids))


def block_key(seq: Request, i: int, bs: int) -> tuple:
    """What identifies block i of seq: its token ids, plus the hashes of the images whose
    placeholders it covers."""
    toks = tuple(seq.all_token_ids[i * bs:(i + 1) * bs])
    feats = seq.mm_features
    if not feats:
        return toks
    lo, hi = i * bs, (i + 1) * bs
    images = tuple(f.identifier for f in feats if f.offset < hi and f.offset + f.length > lo)
    return (toks, images) if images else toks


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks  # 0: the model keeps no KV cache (encoder-only)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        # prefix-cache counters in tokens (cumulative)
        self.queries = 0
        self.hits = 0

    # -- accounting ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks if self.num_blocks else 0.0

    def blocks_needed(self, seq: Request, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_ids))

    # -- prefix cache ---------------------------------------------------------------------------
    def find_cached_prefix(self, seq: Request) -> list[int]:
        """Block ids holding the longest cached prefix of seq's tokens (never the whole sequence:
        at least one token must be computed to produce logits)."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (len(seq.all_token_ids) - 1) // bs
        hits: list[int] = []
        prev = None
        for i in range(max_blocks):
            toks = block_key(seq, i, bs)
            h = chain_hash(prev, toks)
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].token_ids != toks:
                break
            hits.append(bid)
            prev = h
        self.queries += seq.num_tokens
        self.hits += len(hits) * bs
        return hits

    def register_full_blocks(self, seq: Request, num_tokens: int) -> None:
        """Hash every block of seq that is full once num_tokens are computed (not a decoder's that
        reads audio: its KV depends on more than its tokens)."""
        if not self.enable_prefix_caching or seq.has_encoder_input:
            return
        bs = self.block_size
        # a block whose tokens are still in flight on the device is hashed by a later call
        num_tokens = min(num_tokens, len(seq.all_token_ids))
        for i in range(len(seq.block_hashes), num_tokens // bs):
            toks = block_key(seq, i, bs)
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, toks)
            seq.block_hashes.append(h)
            blk = self.blocks[seq.block_ids[i]]
            if blk.hash is None and h not in self.cached:
                blk.hash, blk.token_ids = h, toks
                self.cached[h] = blk.block_id

    # -- allocation ---------------------------------------------------------------------------
    def _take_free(self) -> Block:
        bid, _ = self.free.popitem(last=False)
        blk = self.blocks[bid]
        if blk.hash is not None:  # evict its cached contents
            if self.cached.get(blk.hash) == bid:
                del self.cached[blk.hash]
            blk.hash, blk.token_ids = None, None
        blk.ref_count = 1
        return blk

    def can_allocate(self, seq: Request, num_new_tokens: int, cached: list[int] = ()) -> bool:
        # cached blocks sitting in the free queue stop being free once we take them
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        need = max(0, -(-(seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens)
                        // self.block_size) - len(seq.block_ids) - len(cached))
        return need + revived <= len(self.free)

    def allocate(self, seq: Request, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Give seq the cached prefix blocks (if any) plus enough new blocks for num_new_tokens more
        tokens. Returns False (and changes nothing) if the pool is too small."""
        if not self.can_allocate(seq, num_new_tokens, cached):
            return False
        for bid in cached:
            blk = self.blocks[bid]
            if blk.ref_count == 0:
                self.free.pop(bid, None)
            blk.ref_count += 1
            seq.block_ids.append(bid)
            seq.block_hashes.append(blk.hash)
        seq.num_computed_tokens += len(cached) * self.block_size
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_ids.append(self._take_free().block_id)
        self.register_full_blocks(seq, seq.num_computed_tokens + num_new_tokens)
        return True

    def free_request(self, seq: Request, uncache: bool = False) -> None:
        """Drop seq's references. Tail blocks are queued first so they are evicted first; blocks
        without a hash (never reusable) go to the front of the queue. `uncache`: the request
        failed, so its blocks may hold KV that was never written: none of them stays cached."""
        for bid in reversed(seq.block_ids):
            blk = self.blocks[bid]
            blk.ref_count -= 1
            if blk.ref_count == 0 and uncache and blk.hash is not None:
                if self.cached.get(blk.hash) == bid:
                    del self.cached[blk.hash]
                blk.hash, blk.token_ids = None, None
            if blk.ref_count == 0:
                self.free[bid] = None
                if blk.hash is None:
                    self.free.move_to_end(bid, last=False)
        seq.block_ids = []
        seq.block_hashes = []

    def reset_prefix_cache(self) -> None:
        for blk in self.blocks:
            if blk.ref_count == 0:
                blk.hash, blk.token_ids = None, None
        self.cached = {h: b for h, b in self.cached.items() if self.blocks[b].hash == h}
