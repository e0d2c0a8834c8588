"""Unit tests for freight.core.kv_cache_manager: block tables, the hash chain and prefix hits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freight.core.kv_cache_manager import _ROOT_HASH, KVCacheManager, hash_block
from freight.core.request import Request
from freight.sampling_params import SamplingParams

EOS = 0


def make_req(rid: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(prompt),
                   sampling_params=SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens,
                   eos_token_ids=frozenset({EOS}))


def run_prompt(kv: KVCacheManager, req: Request) -> None:
    """Admit `req` the way the scheduler does and mark its whole prompt computed."""
    blocks, n = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - n, blocks)
    req.num_computed_tokens = req.num_tokens


def free_ids(kv: KVCacheManager) -> list[int]:
    return list(kv.pool.free_queue)


# -- hash_block -----------------------------------------------------------------------------

def test_hash_block_is_deterministic_and_chained():
    h1 = hash_block(_ROOT_HASH, [1, 2, 3, 4])
    assert h1 == hash_block(_ROOT_HASH, [1, 2, 3, 4])
    assert isinstance(h1, bytes) and len(h1) == 16
    assert h1 != hash_block(_ROOT_HASH, [1, 2, 3, 5])
    assert h1 != hash_block(_ROOT_HASH, [4, 3, 2, 1])
    # Same tokens, different parent: different hash.
    assert hash_block(h1, [5, 6]) != hash_block(_ROOT_HASH, [5, 6])
    assert hash_block(h1, [5, 6]) != hash_block(hash_block(_ROOT_HASH, [9, 9, 9, 9]), [5, 6])


def test_block_hashes_filled_for_full_blocks_only():
    kv = KVCacheManager(8, 4)
    req = make_req("a", list(range(1, 11)))  # 10 tokens: 2 full blocks
    kv.get_computed_blocks(req)
    assert len(req.block_hashes) == 2
    h0 = hash_block(_ROOT_HASH, [1, 2, 3, 4])
    assert req.block_hashes == [h0, hash_block(h0, [5, 6, 7, 8])]
    req.append_token(11)
    req.append_token(12)
    kv.get_computed_blocks(req)
    assert len(req.block_hashes) == 3


# -- prefix hits ----------------------------------------------------------------------------

def test_identical_prefix_hits():
    kv = KVCacheManager(10, 4)
    a = make_req("a", list(range(1, 10)))  # 9 tokens, 2 full blocks
    run_prompt(kv, a)
    b = make_req("b", list(range(1, 10)) + [42, 43])
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8
    assert [x.block_id for x in blocks] == kv.block_ids("a")[:2]


def test_partial_prefix_hits_up_to_first_difference():
    kv = KVCacheManager(10, 4)
    a = make_req("a", list(range(1, 14)))  # 3 full blocks
    run_prompt(kv, a)
    b = make_req("b", [1, 2, 3, 4, 5, 6, 7, 99, 9, 10, 11, 12, 13])
    blocks, n = kv.get_computed_blocks(b)
    assert n == 4
    assert [x.block_id for x in blocks] == kv.block_ids("a")[:1]


def test_no_hit_when_only_a_later_block_matches():
    """The hash chain: equal block tokens after different earlier tokens are not a hit."""
    kv = KVCacheManager(10, 4)
    a = make_req("a", [1, 1, 1, 1, 5, 6, 7, 8, 3])
    run_prompt(kv, a)
    b = make_req("b", [2, 2, 2, 2, 5, 6, 7, 8, 3])
    blocks, n = kv.get_computed_blocks(b)
    assert (blocks, n) == ([], 0)
    assert b.block_hashes[1] != a.block_hashes[1]
    assert kv.pool.get_cached_block(b.block_hashes[1]) is None


def test_no_hit_with_caching_disabled():
    kv = KVCacheManager(10, 4, enable_caching=False)
    a = make_req("a", list(range(1, 10)))
    run_prompt(kv, a)
    assert kv.pool.cached == {}
    b = make_req("b", list(range(1, 10)))
    assert kv.get_computed_blocks(b) == ([], 0)
    kv.record_lookup(9, 0)
    assert kv.prefix_stats.queries == 0


@pytest.mark.parametrize("block_size", [1, 2, 4, 16])
def test_fully_cached_prompt_still_computes_last_token(block_size):
    kv = KVCacheManager(64, block_size)
    prompt = list(range(1, 2 * block_size + 1))  # exactly two full blocks
    a = make_req("a", prompt)
    run_prompt(kv, a)
    assert len(kv.pool.cached) == 2
    b = make_req("b", prompt)
    blocks, n = kv.get_computed_blocks(b)
    assert n < len(prompt)
    assert n == block_size  # the block holding the last token is recomputed
    assert kv.allocate_slots(b, len(prompt) - n, blocks)
    assert kv.block_ids("b")[0] == kv.block_ids("a")[0]
    assert kv.block_ids("b")[1] != kv.block_ids("a")[1]


def test_single_token_prompt_never_hits():
    kv = KVCacheManager(4, 1)
    a = make_req("a", [7])
    run_prompt(kv, a)
    assert len(kv.pool.cached) == 1
    assert kv.get_computed_blocks(make_req("b", [7])) == ([], 0)
    blocks, n = kv.get_computed_blocks(make_req("c", [7, 8]))
    assert n == 1 and blocks[0].block_id == kv.block_ids("a")[0]


def test_hit_after_request_freed_until_evicted():
    kv = KVCacheManager(3, 2)
    a = make_req("a", [1, 2, 3, 4, 5])  # 3 blocks, 2 full
    run_prompt(kv, a)
    a_ids = kv.block_ids("a")
    kv.free(a)
    assert kv.num_free_blocks == 3
    blocks, n = kv.get_computed_blocks(make_req("b", [1, 2, 3, 4, 9]))
    assert n == 4 and [x.block_id for x in blocks] == a_ids[:2]
    # Something else takes two blocks: the partial block 2 goes first, then block 1 (tail first).
    other = make_req("o", [8, 8, 8])
    assert kv.allocate_slots(other, 3)
    assert kv.block_ids("o") == [a_ids[2], a_ids[1]]
    blocks, n = kv.get_computed_blocks(make_req("c", [1, 2, 3, 4, 9]))
    assert n == 2 and [x.block_id for x in blocks] == a_ids[:1]


# -- allocate_slots -------------------------------------------------------------------------

def snapshot(kv: KVCacheManager):
    return (list(kv.pool.free_queue), [(b.ref_cnt, b.block_hash) for b in kv.pool.blocks],
            dict(kv.pool.cached), {k: list(v) for k, v in kv.req_blocks.items() if v},
            dict(kv.num_cached_blocks), kv.pool.num_evictions)


def test_allocate_slots_counts_blocks():
    kv = KVCacheManager(10, 4)
    r = make_req("r", list(range(1, 7)))
    assert kv.allocate_slots(r, 3)
    assert len(kv.block_ids("r")) == 1
    r.num_computed_tokens = 3
    assert kv.allocate_slots(r, 1)  # 4 tokens, still one block
    assert len(kv.block_ids("r")) == 1
    r.num_computed_tokens = 4
    assert kv.allocate_slots(r, 2)
    assert len(kv.block_ids("r")) == 2
    assert kv.num_free_blocks == 8


def test_allocate_slots_out_of_blocks_changes_nothing():
    kv = KVCacheManager(3, 4)
    a = make_req("a", list(range(1, 10)))
    run_prompt(kv, a)  # 3 blocks: full
    kv.free(a)
    keep = make_req("k", [5, 5, 5, 5, 5])
    assert kv.allocate_slots(keep, 5)  # evicts two of a's blocks
    before = snapshot(kv)
    big = make_req("big", list(range(1, 10)))
    blocks, n = kv.get_computed_blocks(big)
    assert not kv.allocate_slots(big, big.num_tokens - n, blocks)
    assert snapshot(kv) == before
    assert kv.block_ids("big") == []


def test_cached_free_blocks_count_against_free_blocks():
    """A prefix hit sitting in the free queue is not free any more once taken."""
    kv = KVCacheManager(4, 2)
    a = make_req("a", [1, 2, 3, 4, 5])
    run_prompt(kv, a)  # blocks 0 1 2
    kv.free(a)
    hold = make_req("h", [9])
    assert kv.allocate_slots(hold, 1)  # takes block 3 (never used)
    assert kv.num_free_blocks == 3     # a's three blocks, two of them cached
    # b hits two cached blocks and needs two more: 2 > 3 free - 2 reclaimed.
    b = make_req("b", [1, 2, 3, 4, 6, 7, 8])
    blocks, n = kv.get_computed_blocks(b)
    assert n == 4 and len(blocks) == 2
    before = snapshot(kv)
    assert not kv.allocate_slots(b, b.num_tokens - n, blocks)
    assert snapshot(kv) == before
    # Needing one more block fits exactly.
    c = make_req("c", [1, 2, 3, 4, 6, 7])
    blocks, n = kv.get_computed_blocks(c)
    assert kv.allocate_slots(c, c.num_tokens - n, blocks)
    assert kv.num_free_blocks == 0
    assert kv.block_ids("c")[:2] == [x.block_id for x in blocks]
    assert all(x.ref_cnt == 1 for x in blocks)


def test_shared_hit_increments_ref_count():
    kv = KVCacheManager(8, 2)
    a = make_req("a", [1, 2, 3, 4, 5])
    run_prompt(kv, a)
    b = make_req("b", [1, 2, 3, 4, 6])
    blocks, n = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, b.num_tokens - n, blocks)
    assert [kv.pool.blocks[i].ref_cnt for i in kv.block_ids("a")] == [2, 2, 1]
    assert kv.num_free_blocks == 8 - 4
    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in kv.block_ids("b")] == [1, 1, 1]
    kv.free(b)
    assert kv.num_free_blocks == 8
    assert all(blk.ref_cnt == 0 for blk in kv.pool.blocks)


def test_blocks_published_when_they_will_be_full():
    kv = KVCacheManager(8, 4)
    r = make_req("r", list(range(1, 7)))   # 6 tokens
    assert kv.allocate_slots(r, 3)        # chunk of 3: nothing full yet
    assert kv.pool.cached == {}
    r.num_computed_tokens = 3
    assert kv.allocate_slots(r, 3)        # block 0 will be full
    assert list(kv.pool.cached) == r.block_hashes[:1]
    assert kv.num_cached_blocks["r"] == 1
    r.num_computed_tokens = 6
    r.append_token(7)
    r.append_token(8)                     # pretend two decode tokens arrived
    assert kv.allocate_slots(r, 2)
    assert len(kv.pool.cached) == 2
    assert kv.pool.cached[r.block_hashes[1]].block_id == kv.block_ids("r")[1]


def test_duplicate_content_first_writer_wins():
    kv = KVCacheManager(8, 2)
    a = make_req("a", [1, 2, 3])
    b = make_req("b", [1, 2, 3])
    # Both miss (neither published yet), both compute the block.
    assert kv.get_computed_blocks(a) == ([], 0)
    assert kv.get_computed_blocks(b) == ([], 0)
    assert kv.allocate_slots(a, 3)
    assert kv.allocate_slots(b, 3)
    a0, b0 = kv.pool.blocks[kv.block_ids("a")[0]], kv.pool.blocks[kv.block_ids("b")[0]]
    assert a0 is not b0
    assert kv.pool.cached[a.block_hashes[0]] is a0
    assert b0.block_hash is None
    kv.free(a)
    kv.free(b)
    assert kv.pool.get_cached_block(a.block_hashes[0]) is a0


# -- free -----------------------------------------------------------------------------------

def test_free_releases_tail_first():
    kv = KVCacheManager(6, 2)
    r = make_req("r", [1, 2, 3, 4, 5, 6, 7])
    run_prompt(kv, r)
    ids = kv.block_ids("r")
    assert ids == [0, 1, 2, 3]
    kv.free(r)
    assert free_ids(kv) == [4, 5, 3, 2, 1, 0]
    assert "r" not in kv.req_blocks and "r" not in kv.num_cached_blocks
    assert kv.block_ids("r") == []
    # The shared prefix is evicted last.
    got = kv.pool.allocate(6)
    assert [b.block_id for b in got] == [4, 5, 3, 2, 1, 0]


def test_free_unknown_request_is_noop():
    kv = KVCacheManager(2, 2)
    kv.free(make_req("x", [1]))
    assert kv.num_free_blocks == 2


def test_free_after_failed_allocation_clears_state():
    kv = KVCacheManager(1, 2)
    r = make_req("r", [1, 2, 3])
    assert not kv.allocate_slots(r, 3)
    kv.free(r)
    assert kv.req_blocks == {} and kv.num_cached_blocks == {}
    assert kv.num_free_blocks == 1


def test_record_lookup_and_usage():
    kv = KVCacheManager(4, 2)
    kv.record_lookup(10, 4)
    kv.record_lookup(3, 0)
    assert (kv.prefix_stats.queries, kv.prefix_stats.hits) == (13, 4)
    r = make_req("r", [1, 2, 3])
    assert kv.allocate_slots(r, 3)
    assert kv.usage() == pytest.approx(0.5)


def test_reset_prefix_cache_through_manager():
    kv = KVCacheManager(4, 2)
    a = make_req("a", [1, 2, 3])
    run_prompt(kv, a)
    assert kv.reset_prefix_cache() is False
    kv.free(a)
    assert kv.reset_prefix_cache() is True
    assert kv.get_computed_blocks(make_req("b", [1, 2, 3])) == ([], 0)


# -- property: hits are exactly the longest cached prefix of full blocks --------------------

@settings(max_examples=150, deadline=None)
@given(block_size=st.sampled_from([1, 2, 4]),
       prompts=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=12), min_size=1, max_size=6),
       queries=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=12), min_size=1, max_size=4))
def test_hits_are_longest_identical_prefix(block_size, prompts, queries):
    """With a cache large enough that nothing is evicted, a query hits exactly the leading full
    blocks (excluding the one holding its last token) whose whole prefix some earlier prompt had."""
    kv = KVCacheManager(200, block_size)
    for i, p in enumerate(prompts):
        r = make_req(f"p{i}", p)
        run_prompt(kv, r)
        kv.free(r)
    for q in queries:
        blocks, n = kv.get_computed_blocks(make_req("q", q))
        assert n == len(blocks) * block_size
        assert n <= len(q) - 1
        # Expected: longest k*bs <= len(q)-1 such that q[:k*bs] == p[:k*bs] for some prompt p
        # with len(p) >= k*bs.
        best = 0
        for p in prompts:
            k = 0
            while (k + 1) * block_size <= min(len(q) - 1, len(p)) and \
                    q[:(k + 1) * block_size] == p[:(k + 1) * block_size]:
                k += 1
            best = max(best, k)
        assert len(blocks) == best
        for i, b in enumerate(blocks):
            assert b.block_hash == hash_block(blocks[i - 1].block_hash if i else _ROOT_HASH,
                                              q[i * block_size:(i + 1) * block_size])
