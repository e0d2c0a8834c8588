"""SchedulerStats: one engine core's gauges and running totals, snapshotted after a step.

Plain data: it travels from the engine-core process to the API process with each step's
outputs, where /metrics and the periodic log line read the latest snapshot per engine.
"""

from __future__ import annotations

import bisect

import msgspec

# vLLM's buckets of vllm:iteration_tokens_total (tokens per engine step).
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class StepTokenHistogram(msgspec.Struct):
    """Tokens per engine step (prompt tokens computed + tokens generated), as histogram counts.

    Kept in the core and sent whole with each snapshot: not every step sends outputs, so
    the frontend could not observe each step itself; cumulative counts lose nothing."""

    counts: list[int] = msgspec.field(default_factory=lambda: [0] * (len(ITERATION_TOKENS_BUCKETS) + 1))
    total: int = 0  # the sum of all observations; counts[-1] is the +Inf bucket

    def observe(self, num_tokens: int) -> None:
        self.counts[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, num_tokens)] += 1
        self.total += num_tokens

    def snapshot(self) -> "StepTokenHistogram":
        return StepTokenHistogram(list(self.counts), self.total)

    def merged(self, other: "StepTokenHistogram") -> "StepTokenHistogram":
        return StepTokenHistogram([a + b for a, b in zip(self.counts, other.counts)], self.total + other.total)

    @property
    def count(self) -> int:
        return sum(self.counts)


class SpecDecodingStats(msgspec.Struct):
    """Speculative decoding totals (vLLM's vllm:spec_decode_* counters): drafts verified, their tokens,
    the tokens accepted, and per draft position how often the draft was accepted up to there."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = msgspec.field(default_factory=list)  # one per speculative position

    @classmethod
    def empty(cls, num_speculative_tokens: int) -> "SpecDecodingStats":
        return cls(accepted_per_pos=[0] * num_speculative_tokens)

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    def snapshot(self) -> "SpecDecodingStats":
        return SpecDecodingStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                                 list(self.accepted_per_pos))

    def merged(self, other: "SpecDecodingStats") -> "SpecDecodingStats":
        width = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        pad = lambda xs: xs + [0] * (width - len(xs))  # noqa: E731
        return SpecDecodingStats(self.num_drafts + other.num_drafts, self.num_draft_tokens + other.num_draft_tokens,
                                 self.num_accepted_tokens + other.num_accepted_tokens,
                                 [a + b for a, b in zip(pad(self.accepted_per_pos), pad(other.accepted_per_pos))])


class SchedulerStats(msgspec.Struct):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0       # 0..1, blocks held by requests
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_preemptions: int = 0          # totals since start from here on
    prefix_cache_queries: int = 0     # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0        # of them found there
    num_computed_prompt_tokens: int = 0  # prompt tokens actually run through the model
    num_generated_tokens: int = 0
    num_steps: int = 0
    num_allocated_blocks: int = 0     # block allocations so far (shared blocks count once)
    num_requests_received: int = 0    # requests the engine core has taken in so far
    iteration_tokens: StepTokenHistogram = msgspec.field(default_factory=StepTokenHistogram)
    spec_decoding: SpecDecodingStats = msgspec.field(default_factory=SpecDecodingStats)


_SUMMED = tuple(f for f in SchedulerStats.__struct_fields__
                if f not in ("kv_cache_usage", "iteration_tokens", "spec_decoding"))


def sum_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    """Totals over several engines (data parallelism); usage is blocks held over blocks in all."""
    total = SchedulerStats(**{f: sum(getattr(s, f) for s in stats) for f in _SUMMED})
    total.kv_cache_usage = 1.0 - total.num_free_blocks / total.num_total_blocks if total.num_total_blocks else 0.0
    for s in stats:
        total.iteration_tokens = total.iteration_tokens.merged(s.iteration_tokens)
        total.spec_decoding = total.spec_decoding.merged(s.spec_decoding)
    return total
