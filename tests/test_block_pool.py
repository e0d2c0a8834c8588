"""Unit tests for freight.core.block_pool: free queue (LRU), ref counts, prefix-cache mapping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freight.core.block_pool import BlockPool, KVCacheBlock


def free_ids(pool: BlockPool) -> list[int]:
    return list(pool.free_queue)


def check_pool(pool: BlockPool) -> None:
    """Structural invariants of a pool on its own."""
    assert len(pool.blocks) == pool.num_blocks
    for i, b in enumerate(pool.blocks):
        assert b.block_id == i
        assert b.ref_cnt >= 0
        assert (b.ref_cnt == 0) == (b.block_id in pool.free_queue)
    for bid, b in pool.free_queue.items():
        assert pool.blocks[bid] is b
    for h, b in pool.cached.items():
        assert b.block_hash == h
    for b in pool.blocks:
        if b.block_hash is not None:
            assert pool.cached[b.block_hash] is b
    assert pool.num_free_blocks == len(pool.free_queue)
    assert pool.usage() == pytest.approx(1 - pool.num_free_blocks / pool.num_blocks)


def test_init_all_free_in_id_order():
    pool = BlockPool(5)
    assert free_ids(pool) == [0, 1, 2, 3, 4]
    assert pool.num_free_blocks == 5
    assert pool.usage() == 0.0
    assert all(b.ref_cnt == 0 and b.block_hash is None for b in pool.blocks)
    assert pool.cached == {}
    check_pool(pool)


@pytest.mark.parametrize("n", [0, -1])
def test_needs_at_least_one_block(n):
    with pytest.raises(ValueError):
        BlockPool(n)


def test_allocate_takes_from_front_and_sets_ref():
    pool = BlockPool(4)
    got = pool.allocate(3)
    assert [b.block_id for b in got] == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in got)
    assert free_ids(pool) == [3]
    assert pool.usage() == pytest.approx(0.75)
    assert pool.allocate(0) == []
    check_pool(pool)


def test_allocate_more_than_free_raises_without_change():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    assert free_ids(pool) == [2]
    assert pool.blocks[2].ref_cnt == 0
    check_pool(pool)


def test_free_appends_in_given_order_lru():
    pool = BlockPool(6)
    a = pool.allocate(4)  # 0 1 2 3; free queue: 4 5
    pool.free([a[2], a[0]])
    assert free_ids(pool) == [4, 5, 2, 0]
    pool.free([a[3]])
    assert free_ids(pool) == [4, 5, 2, 0, 3]
    # Allocation follows the queue: least recently freed first.
    got = pool.allocate(5)
    assert [b.block_id for b in got] == [4, 5, 2, 0, 3]
    assert free_ids(pool) == []
    check_pool(pool)


def test_ref_counts_shared_block_freed_only_at_zero():
    pool = BlockPool(3)
    (b,) = pool.allocate(1)
    pool.touch([b])
    pool.touch([b])
    assert b.ref_cnt == 3
    pool.free([b])
    pool.free([b])
    assert b.ref_cnt == 1 and b.block_id not in pool.free_queue
    pool.free([b])
    assert b.ref_cnt == 0 and free_ids(pool)[-1] == b.block_id
    check_pool(pool)


def test_free_more_often_than_taken_raises():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError):
        pool.free([b])
    assert b.ref_cnt == 0
    assert free_ids(pool).count(b.block_id) == 1
    # A block that was never taken cannot be freed either.
    with pytest.raises(RuntimeError):
        pool.free([pool.blocks[1]])
    check_pool(pool)


def test_free_same_block_twice_in_one_call_raises():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    with pytest.raises(RuntimeError):
        pool.free([b, b])
    assert b.ref_cnt == 0


def test_touch_free_block_takes_it_out_of_queue():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.free(blocks)  # queue: 2 3 0 1
    pool.touch([pool.blocks[3], pool.blocks[0]])
    assert free_ids(pool) == [2, 1]
    assert pool.blocks[3].ref_cnt == 1 and pool.blocks[0].ref_cnt == 1
    check_pool(pool)


def test_cache_block_registers_hash():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"h1")
    assert a.block_hash == b"h1"
    assert pool.get_cached_block(b"h1") is a
    assert pool.get_cached_block(b"nope") is None
    # First writer wins: a second block with the same hash is not published.
    pool.cache_block(b, b"h1")
    assert b.block_hash is None
    assert pool.get_cached_block(b"h1") is a
    # A block already published keeps its hash.
    pool.cache_block(a, b"h2")
    assert a.block_hash == b"h1"
    assert pool.get_cached_block(b"h2") is None
    check_pool(pool)


def test_cache_block_noop_without_caching():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache_block(a, b"h")
    assert a.block_hash is None
    assert pool.cached == {}
    assert pool.get_cached_block(b"h") is None


def test_freed_cached_block_stays_findable_until_evicted():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"ha")
    pool.free([a, b])
    assert free_ids(pool) == [2, 0, 1]
    # Still findable while in the free queue.
    assert pool.get_cached_block(b"ha") is a
    assert a.block_hash == b"ha"
    # Allocating block 2 does not evict it.
    pool.allocate(1)
    assert pool.get_cached_block(b"ha") is a
    assert pool.num_evictions == 0
    # Re-taking it from the cache revives it with its contents.
    pool.touch([a])
    assert a.ref_cnt == 1 and a.block_hash == b"ha"
    assert free_ids(pool) == [1]
    check_pool(pool)


def test_eviction_removes_hash_mapping():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"ha")
    pool.cache_block(b, b"hb")
    pool.free([a, b])
    (x,) = pool.allocate(1)
    assert x is a
    assert a.block_hash is None and a.ref_cnt == 1
    assert pool.get_cached_block(b"ha") is None
    assert pool.get_cached_block(b"hb") is b
    assert pool.num_evictions == 1
    # The slot can be published again under a new hash.
    pool.cache_block(a, b"ha2")
    assert pool.get_cached_block(b"ha2") is a
    check_pool(pool)


def test_eviction_lru_order_of_cached_blocks():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    for i, blk in enumerate(blocks):
        pool.cache_block(blk, bytes([i]))
    pool.free([blocks[3], blocks[1], blocks[0], blocks[2]])
    evicted = []
    for _ in range(4):
        (got,) = pool.allocate(1)
        evicted.append(got.block_id)
    assert evicted == [3, 1, 0, 2]
    assert pool.cached == {}
    assert pool.num_evictions == 4
    check_pool(pool)


def test_retaken_and_refreed_block_moves_to_back_of_queue():
    """A cached block that is re-taken and freed again goes to the back (most recently used)."""
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, blk in enumerate(blocks):
        pool.cache_block(blk, bytes([i]))
    pool.free(blocks)  # queue 0 1 2
    pool.touch([blocks[0]])
    pool.free([blocks[0]])  # queue 1 2 0
    assert free_ids(pool) == [1, 2, 0]
    assert [pool.allocate(1)[0].block_id for _ in range(3)] == [1, 2, 0]


def test_reset_prefix_cache_when_idle():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, blk in enumerate(blocks[:2]):
        pool.cache_block(blk, bytes([i]))
    pool.free(blocks)
    order = free_ids(pool)
    assert pool.reset_prefix_cache() is True
    assert pool.cached == {}
    assert all(b.block_hash is None for b in pool.blocks)
    assert free_ids(pool) == order
    assert pool.num_free_blocks == 3
    check_pool(pool)


def test_reset_prefix_cache_refuses_while_cached_block_in_use():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"ha")
    pool.cache_block(b, b"hb")
    pool.free([b])
    assert pool.reset_prefix_cache() is False
    # Nothing changed.
    assert pool.get_cached_block(b"ha") is a and pool.get_cached_block(b"hb") is b
    assert a.block_hash == b"ha" and b.block_hash == b"hb"
    pool.free([a])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(b"ha") is None
    check_pool(pool)


def test_reset_prefix_cache_ignores_uncached_blocks_in_use():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"ha")
    pool.free([a])
    # b is held but not cached: reset still succeeds.
    assert pool.reset_prefix_cache() is True
    assert b.ref_cnt == 1
    check_pool(pool)


# -- a random walk over the pool's operations against a tiny model ------------------------------

@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 6),
       ops=st.lists(st.tuples(st.sampled_from(["alloc", "free", "touch", "cache", "reset"]),
                              st.integers(0, 7), st.integers(0, 3)), max_size=40))
def test_random_ops_against_model(num_blocks, ops):
    pool = BlockPool(num_blocks)
    held: list[KVCacheBlock] = []          # one entry per reference we took
    model_queue = list(range(num_blocks))  # expected free queue order
    model_cache: dict[bytes, int] = {}
    for op, x, y in ops:
        if op == "alloc":
            n = x % (num_blocks + 2)
            if n > len(model_queue):
                with pytest.raises(RuntimeError):
                    pool.allocate(n)
            else:
                got = pool.allocate(n)
                expect = model_queue[:n]
                del model_queue[:n]
                assert [b.block_id for b in got] == expect
                for bid in expect:
                    model_cache = {h: v for h, v in model_cache.items() if v != bid}
                held.extend(got)
        elif op == "free" and held:
            b = held.pop(x % len(held))
            pool.free([b])
            if b not in held:
                model_queue.append(b.block_id)
        elif op == "touch":
            b = pool.blocks[x % num_blocks]
            is_cached = b.block_hash is not None
            if b.ref_cnt > 0 or is_cached:  # only touch blocks a request could legitimately find
                if b.ref_cnt == 0:
                    model_queue.remove(b.block_id)
                pool.touch([b])
                held.append(b)
        elif op == "cache" and held:
            b = held[x % len(held)]
            h = bytes([y])
            if b.block_hash is None and h not in model_cache:
                model_cache[h] = b.block_id
            pool.cache_block(b, h)
        elif op == "reset":
            in_use = any(pool.blocks[bid].ref_cnt > 0 for bid in model_cache.values())
            assert pool.reset_prefix_cache() is (not in_use)
            if not in_use:
                model_cache.clear()
        assert free_ids(pool) == model_queue
        assert {h: b.block_id for h, b in pool.cached.items()} == model_cache
        for b in pool.blocks:
            assert b.ref_cnt == sum(1 for h in held if h is b)
        check_pool(pool)
    pool.free(held)
    assert pool.num_free_blocks == num_blocks
    check_pool(pool)
