"""SchedulerStats: one engine core's gauges and running totals, snapshotted after a step.

Plain data: it travels from the engine-core process to the API process with each step's
outputs, where /metrics and the periodic log line read the latest snapshot per engine.
"""

from __future__ import annotations

import msgspec


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


def sum_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    """Totals over several engines (data parallelism); usage is blocks held over blocks in all."""
    fields = SchedulerStats.__struct_fields__
    total = SchedulerStats(**{f: sum(getattr(s, f) for s in stats) for f in fields if f != "kv_cache_usage"})
    total.kv_cache_usage = 1.0 - total.num_free_blocks / total.num_total_blocks if total.num_total_blocks else 0.0
    return total
