"""EngineCoreStatus: what the live status page shows of one engine core, as compact plain data.

The engine core builds one only while someone watches (a frontend renewed the lease with
`want_status` in the last LEASE_S seconds) and at most every MIN_INTERVAL_S, after a step;
it travels to the frontend on the output channel, in EngineCoreOutputs.status.

The KV cache map is one byte per block (BlockState) plus, per block, the index in
running + waiting of a request that holds it (-1: none): a few bytes a block, built with
numpy from the requests' block tables, never a record per block.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

import msgspec
import numpy as np

from freight.core.stats import SchedulerStats

if TYPE_CHECKING:  # (messages.py imports this module: keep it free of the scheduler's imports)
    from freight.core.kv_cache_manager import KVCacheManager
    from freight.core.request import Request
    from freight.core.scheduler import Scheduler

LEASE_S = 2.0            # how long one want_status keeps snapshots coming
MIN_INTERVAL_S = 0.25    # at most this often: a snapshot walks every block table
NUM_RECENT_STEPS = 32


class BlockState(enum.IntEnum):
    FREE = 0
    CACHED = 1      # free, but still holds a prefix-cached block (a hit reclaims it)
    HELD = 2        # held by one request
    SHARED = 3      # held by several (a shared prefix, or n > 1 siblings)


class RequestSnapshot(msgspec.Struct, array_like=True):
    """One request (sequence) in the running or waiting queue."""

    request_id: str
    status: str                 # "running" | "waiting" | "preempted"
    num_prompt_tokens: int
    num_output_tokens: int
    num_computed_tokens: int
    num_blocks: int
    age_s: float                # since it arrived
    num_preemptions: int


class StepSample(msgspec.Struct, array_like=True):
    duration_s: float
    num_tokens: int             # tokens scheduled in the step
    num_seqs: int               # sequences scheduled in the step


class EngineCoreStatus(msgspec.Struct):
    engine_index: int
    time: float                 # time.monotonic() when it was built
    block_size: int
    block_states: bytes         # one BlockState per block
    block_holders: bytes        # int32 per block: an index into running + waiting, -1 for none
    shared_block_refs: dict[int, int]   # block id -> ref count, for SHARED blocks only
    running: list[RequestSnapshot]
    waiting: list[RequestSnapshot]
    recent_steps: list[StepSample]      # the last steps, oldest first
    stats: SchedulerStats

    @property
    def num_blocks(self) -> int:
        return len(self.block_states)

    def states(self) -> np.ndarray:
        return np.frombuffer(self.block_states, dtype=np.uint8)

    def holders(self) -> np.ndarray:
        return np.frombuffer(self.block_holders, dtype="<i4")


class RecentSteps:
    """The last steps' durations and batch sizes (a bounded deque: cheap enough for every step)."""

    def __init__(self, maxlen: int = NUM_RECENT_STEPS):
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=maxlen)  # (tuples: cheaper than structs)

    def record(self, duration_s: float, num_tokens: int, num_seqs: int) -> None:
        self._samples.append((duration_s, num_tokens, num_seqs))

    def samples(self) -> list[StepSample]:
        return [StepSample(*s) for s in self._samples]


class StatusLease:
    """Whether a snapshot is wanted and due: asked for recently, and none sent for MIN_INTERVAL_S."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._wanted_until = 0.0
        self._last_built = 0.0

    def renew(self) -> None:
        self._wanted_until = self.clock() + LEASE_S

    def take_due(self) -> bool:
        """True (and the interval restarts) when a snapshot should be built now."""
        if not self._wanted_until:
            return False  # the common case: nobody has ever watched
        now = self.clock()
        if now > self._wanted_until or now - self._last_built < MIN_INTERVAL_S:
            return False
        self._last_built = now
        return True


def build_status(engine_index: int, scheduler: Scheduler, kv: KVCacheManager, recent_steps: RecentSteps,
                 stats: SchedulerStats) -> EngineCoreStatus:
    now = time.monotonic()
    running, waiting = list(scheduler.running), list(scheduler.waiting)
    num_blocks = kv.pool.num_blocks
    refs = np.zeros(num_blocks, dtype=np.int32)
    holders = np.full(num_blocks, -1, dtype="<i4")
    for index, req in enumerate(running + waiting):
        ids = kv.block_ids(req.request_id)
        if ids:
            refs[ids] += 1  # a table never lists one block twice
            holders[ids] = index
    states = np.where(refs > 1, BlockState.SHARED, np.where(refs == 1, BlockState.HELD, BlockState.FREE))
    cached_free = [b.block_id for b in kv.pool.cached.values() if b.ref_cnt == 0]
    states[cached_free] = BlockState.CACHED
    shared = np.flatnonzero(refs > 1)
    return EngineCoreStatus(
        engine_index=engine_index, time=now, block_size=kv.block_size,
        block_states=states.astype(np.uint8).tobytes(), block_holders=holders.tobytes(),
        shared_block_refs=dict(zip(shared.tolist(), refs[shared].tolist())),
        running=[_request_snapshot(r, kv, now) for r in running],
        waiting=[_request_snapshot(r, kv, now) for r in waiting],
        recent_steps=recent_steps.samples(), stats=stats)


def _request_snapshot(req: Request, kv: KVCacheManager, now: float) -> RequestSnapshot:
    return RequestSnapshot(req.request_id, req.status.value, req.num_prompt_tokens, len(req.output_token_ids),
                           req.num_computed_tokens, len(kv.req_blocks.get(req.request_id, ())),
                           max(now - req.arrival_time, 0.0), req.num_preemptions)


def block_counts(status: EngineCoreStatus) -> dict[str, int]:
    """How many blocks are in each state, by BlockState name in lower case."""
    counts = np.bincount(status.states(), minlength=len(BlockState))
    return {s.name.lower(): int(counts[s]) for s in BlockState}
