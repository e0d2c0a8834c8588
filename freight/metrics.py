"""Prometheus metrics under vLLM's names, so existing dashboards and alerts keep working.

Two sources feed them:
- engine totals and gauges (running/waiting, KV usage, prefix cache, preemptions) are
  read from each engine core's latest stats snapshot at scrape time by a custom
  collector, so they are exactly the engines' own counters and cost nothing between
  scrapes; one sample per engine core, labelled engine="0", "1", ... as vLLM does
  with data parallelism (sum over `engine` for the totals);
- per-request figures (tokens, TTFT, inter-token latency, e2e, queue time, finish
  reasons) are recorded from each RequestOutput by `observe`, on the frontend's
  output thread (prometheus_client's metrics are thread-safe).
Each ServerMetrics has its own CollectorRegistry, so one process can host several
servers (tests) without duplicate-metric errors.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from freight.core.stats import SchedulerStats
from freight.outputs import RequestOutput

# vLLM's buckets, with finer ones at the bottom: tiny models answer in microseconds.
_TTFT_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_REQUEST_BUCKETS = [0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineStatsCollector(Collector):
    def __init__(self, model_name: str, stats: Callable[[], list[SchedulerStats]]):
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        per_engine = self.stats()
        labels = ["model_name", "engine"]

        def family(kind, name: str, doc: str, value: Callable[[SchedulerStats], float]):
            f = kind(name, doc, labels=labels)
            for i, s in enumerate(per_engine):
                f.add_metric([self.model_name, str(i)], value(s))
            return f

        def gauge(name: str, doc: str, value: Callable[[SchedulerStats], float]) -> GaugeMetricFamily:
            return family(GaugeMetricFamily, name, doc, value)

        def counter(name: str, doc: str, value: Callable[[SchedulerStats], float]) -> CounterMetricFamily:
            return family(CounterMetricFamily, name, doc, value)

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    lambda s: s.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                    lambda s: s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    lambda s: s.kv_cache_usage)
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                      lambda s: s.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      lambda s: s.prefix_cache_hits)
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.",
                      lambda s: s.num_preemptions)
        # freight's own: the block counts behind kv_cache_usage_perc (a leak shows as free < total at rest).
        yield gauge("freight:kv_cache_free_blocks", "KV cache blocks not held by any request.",
                    lambda s: s.num_free_blocks)
        yield gauge("freight:kv_cache_total_blocks", "KV cache blocks in total.", lambda s: s.num_total_blocks)
        yield counter("freight:engine_steps", "Engine steps run.", lambda s: s.num_steps)


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], list[SchedulerStats]]):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(model_name, stats))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes etc. of the API process
        r, labels = self.registry, ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         labels, registry=r).labels(model_name)
        self.request_success = Counter("vllm:request_success", "Count of finished requests, by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              labels, buckets=_TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             labels, buckets=_ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             labels, buckets=_REQUEST_BUCKETS, registry=r).labels(model_name)
        self.queue_time = Histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in the WAITING phase for a request.",
                                    labels, buckets=_REQUEST_BUCKETS, registry=r).labels(model_name)
        self._last_token_time: dict[str, float] = {}  # request id -> time of its previous token

    def observe(self, out: RequestOutput) -> None:
        """Record one RequestOutput (called for every output, on the engine thread)."""
        rid, m = out.request_id, out.metrics
        new_tokens = sum(len(d) for d in out.delta_token_ids)
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
        if m is not None and new_tokens and m.last_token_time is not None:
            prev = self._last_token_time.get(rid)
            if prev is None and m.first_token_time is not None:
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                self.ttft.observe(m.first_token_time - m.arrival_time)
                if m.first_scheduled_time is not None:
                    self.queue_time.observe(max(m.first_scheduled_time - m.arrival_time, 0.0))
            elif prev is not None and m.last_token_time > prev:
                self.itl.observe(m.last_token_time - prev)
            self._last_token_time[rid] = m.last_token_time
        if out.finished:
            self._last_token_time.pop(rid, None)
            reason = next((c.finish_reason for c in out.outputs if c.finish_reason), "abort")
            self.request_success.labels(self.model_name, reason).inc()
            if m is not None:
                self.e2e.observe((m.finished_time or m.last_token_time or m.arrival_time) - m.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
