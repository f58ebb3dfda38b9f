"""KV-cache block bookkeeping: ref counts, prefix hash chain, LRU eviction of cached free blocks."""
from __future__ import annotations

from pagoda.engine.kv_cache_manager import KVCacheManager as BlockManager
from pagoda.engine.request import Request
from pagoda.sampling_params import SamplingParams


def seq(ids, rid="r"):
    return Request(rid, list(ids), SamplingParams())


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(8, 4)
    s = seq(range(10))
    assert bm.allocate(s, 10)
    assert len(s.block_ids) == 3 and bm.num_free_blocks == 5
    bm.free_request(s)
    assert bm.num_free_blocks == 8 and all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(8, 4)
    a = seq(range(10), "a")
    assert bm.allocate(a, 10)
    b = seq(list(range(8)) + [99, 98], "b")
    hit = bm.find_cached_prefix(b)
    assert hit == a.block_ids[:2]                     # two full blocks of the shared 8 tokens
    assert bm.allocate(b, 2, hit)
    assert b.num_computed_tokens == 8
    assert [bm.blocks[i].ref_count for i in hit] == [2, 2]
    bm.free_request(a)
    assert [bm.blocks[i].ref_count for i in hit] == [1, 1]


def test_a_different_prefix_does_not_hit():
    bm = BlockManager(8, 4)
    a = seq(range(10), "a")
    bm.allocate(a, 10)
    b = seq([1000] + list(range(1, 10)), "b")
    assert bm.find_cached_prefix(b) == []


def test_whole_prompt_never_fully_cached():
    bm = BlockManager(8, 4)
    a = seq(range(8), "a")
    bm.allocate(a, 8)
    assert len(bm.find_cached_prefix(seq(range(8), "b"))) == 1  # last token must be computed


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(4, 4)
    a = seq(range(9), "a")
    bm.allocate(a, 9)                       # 3 blocks, 2 full (hashed)
    bm.free_request(a)
    assert bm.num_free_blocks == 4
    again = seq(range(9), "a2")
    assert len(bm.find_cached_prefix(again)) == 2   # still cached after free
    big = seq(range(100, 116), "big")
    assert bm.allocate(big, 16)             # needs all 4 blocks: evicts the cached ones
    assert bm.find_cached_prefix(seq(range(9), "a3")) == []
    assert not bm.allocate(seq(range(200, 204), "c"), 4)  # pool exhausted: refuse, change nothing


def test_usage_ratio():
    bm = BlockManager(10, 4)
    s = seq(range(12))
    bm.allocate(s, 12)
    assert abs(bm.usage() - 0.3) < 1e-9
    bm.free_request(s)
    assert bm.usage() == 0.0
