"""StatusFeed: the live status page's snapshots, as JSON-ready plain data.

It merges each engine core's latest EngineCoreStatus (KV block map, queues, recent steps,
stats: core/status.py) with what only the frontend sees: TTFT and TPOT of the requests of
the last WINDOW_S seconds (from every RequestOutput, as an AsyncLLM output observer) and
tokens/s and the prefix-cache hit rate over the last RATE_WINDOW_S seconds (from the
stats totals of consecutive snapshots).

The cores send snapshots only while their lease is renewed: `keep_watching()` renews it
(at most every RENEW_INTERVAL_S, however many pages are open) and is called by whoever
is watching (the SSE stream, the snapshot endpoint).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from typing import Optional

import msgspec
import numpy as np

from freight.core.status import LEASE_S, EngineCoreStatus, block_counts
from freight.engine.async_llm import AsyncLLM
from freight.engine.core_client import EngineDeadError
from freight.outputs import RequestOutput

WINDOW_S = 60.0
RATE_WINDOW_S = 5.0
RENEW_INTERVAL_S = LEASE_S / 4  # a lost or late renewal never lets a watched core go quiet
PERCENTILES = (50, 90, 99)


class LatencyWindow:
    """Samples (seconds) of the last window_s seconds; thread-safe (added on the output thread)."""

    def __init__(self, window_s: float = WINDOW_S):
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()  # (time.monotonic(), value)
        self._lock = threading.Lock()

    def add(self, value: float, now: float) -> None:
        with self._lock:
            self._samples.append((now, value))
            self._expire(now)

    def summary(self, now: float) -> dict:
        """{"count", "p50", "p90", "p99"} over the window (percentiles None when it is empty)."""
        with self._lock:
            self._expire(now)
            values = np.array([v for _, v in self._samples])
        if not len(values):
            return {"count": 0, **{f"p{p}": None for p in PERCENTILES}}
        marks = np.percentile(values, PERCENTILES)
        return {"count": len(values), **{f"p{p}": float(v) for p, v in zip(PERCENTILES, marks)}}

    def _expire(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()


class RateWindow:
    """Rates of one engine's running totals over the snapshots of the last RATE_WINDOW_S seconds."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s = window_s
        self._points: deque[tuple[float, int, int, int, int]] = deque()  # (time, prompt, generated, queries, hits)

    def add(self, status: EngineCoreStatus) -> None:
        if self._points and self._points[-1][0] >= status.time:
            return  # the same snapshot again
        s = status.stats
        self._points.append((status.time, s.num_computed_prompt_tokens, s.num_generated_tokens,
                             s.prefix_cache_queries, s.prefix_cache_hits))
        while len(self._points) > 2 and self._points[1][0] < status.time - self.window_s:
            self._points.popleft()

    def rates(self) -> dict:
        """prompt and generation tokens/s, and the hit rate of the prefix-cache lookups in the window."""
        if len(self._points) < 2:
            return {"prompt_tokens_per_s": None, "generation_tokens_per_s": None, "prefix_cache_hit_rate": None}
        (t0, p0, g0, q0, h0), (t1, p1, g1, q1, h1) = self._points[0], self._points[-1]
        dt = t1 - t0
        return {"prompt_tokens_per_s": (p1 - p0) / dt, "generation_tokens_per_s": (g1 - g0) / dt,
                "prefix_cache_hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else None}


class StatusFeed:
    def __init__(self, async_llm: AsyncLLM):
        self.async_llm = async_llm
        self.ttft = LatencyWindow()
        self.tpot = LatencyWindow()
        self._rates = [RateWindow() for _ in range(async_llm.data_parallel_size)]
        self._first_token_seen: set[str] = set()  # requests whose TTFT is recorded (output thread only)
        self._last_renewal = 0.0

    # -- the output thread --------------------------------------------------------
    def observe(self, out: RequestOutput) -> None:
        """Record TTFT at a request's first token and TPOT when it finishes."""
        m = out.metrics
        if m is None or not isinstance(out, RequestOutput):  # (embeddings have neither)
            return
        now = time.monotonic()
        if m.first_token_time is not None and out.request_id not in self._first_token_seen:
            self._first_token_seen.add(out.request_id)
            self.ttft.add(m.first_token_time - m.arrival_time, now)
        if out.finished:
            self._first_token_seen.discard(out.request_id)
            num_tokens = max((len(c.token_ids) for c in out.outputs), default=0)
            if num_tokens > 1 and m.first_token_time is not None and m.last_token_time is not None:
                self.tpot.add((m.last_token_time - m.first_token_time) / (num_tokens - 1), now)

    # -- the watchers' side (event loop) ------------------------------------------------
    @property
    def is_open(self) -> bool:
        """False once the server shuts down: watchers must let go (an open stream would hold up the exit)."""
        return self.async_llm.is_healthy and not self.async_llm.is_stopping

    def keep_watching(self) -> None:
        now = time.monotonic()
        if now - self._last_renewal >= RENEW_INTERVAL_S and self.is_open:
            self._last_renewal = now
            with contextlib.suppress(EngineDeadError):  # (a core died just now: the page shows it unhealthy)
                self.async_llm.want_status()

    def latest(self) -> list[Optional[EngineCoreStatus]]:
        statuses = self.async_llm.get_engine_status()
        for rates, status in zip(self._rates, statuses):
            if status is not None:
                rates.add(status)
        return statuses

    def snapshot(self) -> dict:
        """The page's whole state now: every engine core's section, and the frontend-wide figures."""
        now = time.monotonic()
        engines = [_engine_section(i, s, self._rates[i].rates(), now) for i, s in enumerate(self.latest())]
        totals = {key: _sum_known(e.get(key) for e in engines)
                  for key in ("prompt_tokens_per_s", "generation_tokens_per_s")}
        return {"time": time.time(), "window_s": WINDOW_S, "rate_window_s": RATE_WINDOW_S,
                "ttft_s": self.ttft.summary(now), "tpot_s": self.tpot.summary(now), **totals,
                "healthy": self.async_llm.is_healthy, "engines": engines}


def _engine_section(index: int, status: Optional[EngineCoreStatus], rates: dict, now: float) -> dict:
    if status is None:
        return {"engine_index": index, "pending": True}
    stats, steps = status.stats, status.recent_steps
    requests = [dict(msgspec.structs.asdict(r), queue=queue)
                for queue, rs in (("running", status.running), ("waiting", status.waiting)) for r in rs]
    return {
        "engine_index": index, "pending": False, "age_s": max(now - status.time, 0.0),
        "block_size": status.block_size, "num_blocks": status.num_blocks,
        # one digit (a BlockState) per block; holders index into `requests`
        "block_states": (status.states() + ord("0")).tobytes().decode("ascii"),
        "block_holders": status.holders().tolist(),
        "shared_block_refs": {str(b): n for b, n in status.shared_block_refs.items()},
        "block_counts": block_counts(status),
        "requests": requests, "num_running": len(status.running), "num_waiting": len(status.waiting),
        "kv_cache_usage": stats.kv_cache_usage, "num_preemptions": stats.num_preemptions,
        "prefix_cache_hit_rate_total": stats.prefix_cache_hits / stats.prefix_cache_queries
        if stats.prefix_cache_queries else None,
        "num_steps": stats.num_steps,
        "recent_steps": [[s.duration_s, s.num_tokens, s.num_seqs] for s in steps],
        "mean_step_time_s": sum(s.duration_s for s in steps) / len(steps) if steps else None,
        "mean_batch_tokens": sum(s.num_tokens for s in steps) / len(steps) if steps else None,
        "mean_batch_seqs": sum(s.num_seqs for s in steps) / len(steps) if steps else None,
        **rates,
    }


def _sum_known(values) -> Optional[float]:
    known = [v for v in values if v is not None]
    return sum(known) if known else None
