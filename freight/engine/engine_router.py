"""EngineRouter: which engine core holds each unfinished request, and each core's latest stats.

A frontend with several engine cores (data parallelism) sends every new request to the
core with the fewest unfinished requests, as the frontend itself counts them (running +
waiting there, plus what is still in transit), so the choice needs no round trip.
"""

from __future__ import annotations

from typing import Optional

from freight.core.stats import SchedulerStats, sum_stats
from freight.engine.messages import EngineCoreOutputs


class EngineRouter:
    def __init__(self, num_engines: int):
        self.engine_of: dict[str, int] = {}          # unfinished request -> its engine core
        self.load = [0] * num_engines                # unfinished requests per engine
        self.stats = [SchedulerStats() for _ in range(num_engines)]
        self._sent = [0] * num_engines               # requests sent to each engine so far

    @property
    def num_engines(self) -> int:
        return len(self.load)

    @property
    def num_unfinished(self) -> int:
        return len(self.engine_of)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.engine_of

    def assign(self, request_id: str) -> int:
        """The least loaded engine, now holding request_id."""
        engine = min(range(len(self.load)), key=self.load.__getitem__)
        self.engine_of[request_id] = engine
        self.load[engine] += 1
        self._sent[engine] += 1
        return engine

    def release(self, request_id: str) -> Optional[int]:
        """Forget a request that finished or was aborted; its engine, None if it was not unfinished."""
        engine = self.engine_of.pop(request_id, None)
        if engine is not None:
            self.load[engine] -= 1
        return engine

    def record(self, outs: EngineCoreOutputs) -> None:
        if outs.stats is not None:
            self.stats[outs.engine_index] = outs.stats

    def num_waiting(self) -> int:
        """Waiting in the cores at their last stats, plus what is still in transit to them (it may be
        waiting too). In transit: sent, and not yet counted as received by a core's stats (stats that
        a core made before it took a request in must not make that request vanish)."""
        in_transit = sum(sent - s.num_requests_received for sent, s in zip(self._sent, self.stats))
        return sum(s.num_waiting for s in self.stats) + in_transit

    def total_stats(self) -> SchedulerStats:
        return sum_stats(self.stats) if len(self.stats) > 1 else self.stats[0]
