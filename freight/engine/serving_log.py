"""Log lines of the serving frontend: one per finished request, and periodic engine stats."""

from __future__ import annotations

import logging
import time
from typing import Optional, Union

from freight.core.stats import SchedulerStats
from freight.outputs import EmbeddingRequestOutput, RequestMetrics, RequestOutput

logger = logging.getLogger("freight.engine.async_llm")


def log_finished(out: Union[RequestOutput, EmbeddingRequestOutput]) -> None:
    """One line per finished request: its tokens and the phases of its timeline."""
    if isinstance(out, EmbeddingRequestOutput):
        logger.info("request %s finished (embedding): prompt %d tokens%s", out.request_id,
                    len(out.prompt_token_ids), _phases(out.metrics))
        return
    reason = ",".join(sorted({c.finish_reason or "?" for c in out.outputs}))
    gen = sum(len(c.token_ids) for c in out.outputs)
    m = out.metrics
    logger.info("request %s finished (%s): prompt %d tokens (%d cached), generated %d tokens%s, preemptions %d",
                out.request_id, reason, len(out.prompt_token_ids), out.num_cached_tokens, gen, _phases(m),
                m.num_preemptions if m is not None else 0)


def _phases(m: Optional[RequestMetrics]) -> str:
    """", queue 0.001s, prefill 0.020s, decode 0.300s, TTFT 0.021s, e2e 0.322s" (a phase not reached: -)."""
    if m is None:
        return ""

    def secs(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.3f}s"

    ttft = None if m.first_token_time is None else m.first_token_time - m.arrival_time
    e2e = (m.finished_time or time.monotonic()) - m.arrival_time
    return (f", queue {secs(m.queue_time)}, prefill {secs(m.prefill_time)}, decode {secs(m.decode_time)}, "
            f"TTFT {secs(ttft)}, e2e {secs(e2e)}")


class StatsLogger:
    """Periodic engine stats: throughput since the last line, queue sizes, KV cache usage."""

    def __init__(self, interval: float):
        self.interval = interval
        self._last_time = time.monotonic()
        self._last: Optional[SchedulerStats] = None

    def maybe_log(self, stats: SchedulerStats) -> None:
        now = time.monotonic()
        if not self.interval or now - self._last_time < self.interval:
            return
        last, dt = self._last, now - self._last_time
        self._last, self._last_time = stats, now
        prompt = stats.num_computed_prompt_tokens - (last.num_computed_prompt_tokens if last else 0)
        gen = stats.num_generated_tokens - (last.num_generated_tokens if last else 0)
        if not (prompt or gen or stats.num_running or stats.num_waiting):
            return  # idle: say nothing
        logger.info("engine: prompt %.1f tokens/s, generation %.1f tokens/s, running %d, waiting %d, "
                    "KV cache %.1f%% (%d/%d blocks free), preemptions %d, prefix cache hit rate %.1f%%",
                    prompt / dt, gen / dt, stats.num_running, stats.num_waiting, 100 * stats.kv_cache_usage,
                    stats.num_free_blocks, stats.num_total_blocks, stats.num_preemptions,
                    100 * stats.prefix_cache_hits / max(stats.prefix_cache_queries, 1))
