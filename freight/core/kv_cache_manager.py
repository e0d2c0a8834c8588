"""KVCacheManager: per-request block tables on top of the BlockPool, and prefix-cache lookups.

A full block is identified by a hash chained over everything before it:
hash(parent block's hash, the block's token ids). Two requests therefore share a
block only when they share the entire prefix up to and including it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from freight.core.block_pool import BlockPool, KVCacheBlock
from freight.core.request import Request

_ROOT_HASH = b"freight-prefix-root"


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.blake2b(parent + np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=16).digest()


@dataclass
class PrefixCacheStats:
    queries: int = 0   # prompt tokens looked up
    hits: int = 0      # of them found in the cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # how many leading blocks are already published
        self.prefix_stats = PrefixCacheStats()
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies the runner must do first
        self.rewritten: set[str] = set()  # requests whose table had a block replaced (copy on write)
        self.num_allocated_blocks = 0  # total allocations, for counters that show sharing

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def _update_hashes(self, request: Request) -> list[bytes]:
        hashes = request.block_hashes
        bs = self.block_size
        tokens = request.all_token_ids
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else _ROOT_HASH, tokens[i * bs:(i + 1) * bs]))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of the request's leading full blocks already in the cache.

        The last token is always recomputed (its logits are needed), so a prompt that is
        entirely cached still leaves at least one token to run.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0  # prompt logprobs need every prompt position computed
        pooling = request.pooling_params
        if pooling is not None and pooling.pooling_type == "MEAN":
            # Mean pooling needs the hidden state of every prompt position, and a cache hit skips
            # computing them: such requests take no prefix-cache hits (they still fill the cache).
            return [], 0
        hashes = self._update_hashes(request)
        max_hits = (request.num_tokens - 1) // self.block_size
        blocks = []
        for h in hashes[:max_hits]:
            b = self.pool.get_cached_block(h)
            if b is None:
                break
            blocks.append(b)
        return blocks, len(blocks) * self.block_size

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's prefix-cache lookup (failed admissions retry and don't count)."""
        if self.enable_caching:
            self.prefix_stats.queries += num_tokens
            self.prefix_stats.hits += num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] = ()) -> bool:
        """Make room for num_new_tokens more tokens; False (and no change) if blocks run out."""
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        need = -(-total // self.block_size) - len(blocks) - len(new_computed_blocks)
        # Writing into a partly filled block shared with a sibling sequence: copy it first.
        cow = (num_computed % self.block_size != 0 and num_computed // self.block_size == len(blocks) - 1
               and blocks[-1].ref_cnt > 1)
        # Cache hits that sit in the free queue stop being free once we take them.
        reclaimed = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if max(need, 0) + cow > self.pool.num_free_blocks - reclaimed:
            return False
        if cow:
            shared = blocks[-1]
            blocks[-1] = self._allocate(1)[0]
            self.pending_copies.append((shared.block_id, blocks[-1].block_id))
            self.rewritten.add(request.request_id)
            self.pool.free([shared])
        self.pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        if need > 0:
            blocks.extend(self._allocate(need))
        self._cache_full_blocks(request, blocks, total)
        return True

    def _allocate(self, n: int) -> list[KVCacheBlock]:
        self.num_allocated_blocks += n
        return self.pool.allocate(n)

    def fork(self, parent: Request, child: Request) -> None:
        """Give child the parent's blocks (shared by reference; written ones get copied on write)."""
        blocks = self.req_blocks[parent.request_id]
        self.pool.touch(blocks)
        self.req_blocks[child.request_id] = list(blocks)
        self.num_cached_blocks[child.request_id] = self.num_cached_blocks.get(parent.request_id, 0)
        child.block_hashes = list(parent.block_hashes)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def take_rewritten_tables(self) -> set[str]:
        rewritten, self.rewritten = self.rewritten, set()
        return rewritten

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        """Publish the blocks that will be full once this step's tokens are written."""
        if not self.enable_caching:
            return
        hashes = self._update_hashes(request)
        done = self.num_cached_blocks.get(request.request_id, 0)
        upto = min(num_tokens // self.block_size, len(hashes))
        for i in range(done, upto):
            self.pool.cache_block(blocks[i], hashes[i])
        self.num_cached_blocks[request.request_id] = max(done, upto)

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        # Tail blocks first: they are the least likely to be shared, so evict them first.
        self.pool.free(reversed(blocks))

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
