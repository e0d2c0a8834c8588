"""Prometheus metrics under vLLM's names, so existing dashboards and alerts keep working.

Two sources feed them:
- engine totals and gauges (running/waiting, KV usage, prefix cache, preemptions, tokens
  per step) are read from each engine core's latest stats snapshot at scrape time by a
  custom collector, so they are exactly the engines' own counters and cost nothing
  between scrapes; one sample per engine core, labelled engine="0", "1", ... as vLLM
  does with data parallelism (sum over `engine` for the totals);
- per-request figures (tokens, TTFT, inter-token latency, the phases of the request's
  timeline, finish reasons, n and max_tokens) are recorded from each RequestOutput by
  `observe`, on the frontend's output thread (prometheus_client's metrics are thread-safe).
Each ServerMetrics has its own CollectorRegistry, so one process can host several
servers (tests) without duplicate-metric errors.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from freight.core.stats import ITERATION_TOKENS_BUCKETS, SchedulerStats
from freight.outputs import EmbeddingRequestOutput, RequestOutput

# vLLM's buckets, with finer ones at the bottom: tiny models answer in microseconds.
_TTFT_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_REQUEST_BUCKETS = [0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
_N_BUCKETS = [1, 2, 5, 10, 20]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's buckets of token-count histograms)."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return buckets
            buckets.append(m * scale)
        scale *= 10


def cache_config_labels(block_size: int, enable_prefix_caching: bool, num_gpu_blocks: int) -> dict[str, str]:
    """One engine's labels of vllm:cache_config_info, under vLLM's CacheConfig names and str() values
    (num_gpu_blocks keeps vLLM's name whatever the device; freight's KV cache has the model's dtype,
    which is vLLM's cache_dtype "auto")."""
    return {"block_size": str(block_size), "cache_dtype": "auto", "enable_prefix_caching": str(enable_prefix_caching),
            "num_gpu_blocks": str(num_gpu_blocks)}


class _EngineStatsCollector(Collector):
    def __init__(self, model_name: str, stats: Callable[[], list[SchedulerStats]],
                 cache_config: Sequence[dict[str, str]]):
        self.model_name = model_name
        self.stats = stats
        self.cache_config = cache_config  # per engine

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
        yield self._iteration_tokens(per_engine)
        if any(s.spec_decoding.accepted_per_pos for s in per_engine):  # speculative decoding is configured
            yield counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.",
                          lambda s: s.spec_decoding.num_drafts)
            yield counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.",
                          lambda s: s.spec_decoding.num_draft_tokens)
            yield counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.",
                          lambda s: s.spec_decoding.num_accepted_tokens)
            yield self._accepted_per_pos(per_engine)
        if self.cache_config:
            yield self._cache_config_info()
        # freight's own: the block counts behind kv_cache_usage_perc (a leak shows as free < total at rest).
        yield gauge("freight:kv_cache_free_blocks", "KV cache blocks not held by any request.",
                    lambda s: s.num_free_blocks)
        yield gauge("freight:kv_cache_total_blocks", "KV cache blocks in total.", lambda s: s.num_total_blocks)
        yield counter("freight:engine_steps", "Engine steps run.", lambda s: s.num_steps)

    def _iteration_tokens(self, per_engine: list[SchedulerStats]) -> HistogramMetricFamily:
        f = HistogramMetricFamily("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                  labels=["model_name", "engine"])
        for i, s in enumerate(per_engine):
            h, cumulative, buckets = s.iteration_tokens, 0, []
            for bound, n in zip([*ITERATION_TOKENS_BUCKETS, float("inf")], h.counts):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else str(float(bound)), cumulative))
            f.add_metric([self.model_name, str(i)], buckets, sum_value=h.total)
        return f

    def _accepted_per_pos(self, per_engine: list[SchedulerStats]) -> CounterMetricFamily:
        f = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos", "Accepted tokens per draft position.",
                                labels=["model_name", "engine", "position"])
        for i, s in enumerate(per_engine):
            for pos, n in enumerate(s.spec_decoding.accepted_per_pos):
                f.add_metric([self.model_name, str(i), str(pos)], n)
        return f

    def _cache_config_info(self) -> GaugeMetricFamily:
        # As vLLM's info metric: a gauge at 1 whose labels carry the configuration (plus model_name, as
        # every freight series has it).
        names = ["model_name", *self.cache_config[0], "engine"]
        f = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels=names)
        for i, info in enumerate(self.cache_config):
            f.add_metric([self.model_name, *info.values(), str(i)], 1.0)
        return f


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], list[SchedulerStats]], max_model_len: int = 1 << 20,
                 cache_config: Sequence[dict[str, str]] = ()):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(model_name, stats, list(cache_config)))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes etc. of the API process
        r, labels = self.registry, ["model_name"]

        def histogram(name: str, doc: str, buckets: list) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         labels, registry=r).labels(model_name)
        self.request_success = Counter("vllm:request_success", "Count of finished requests, by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              _TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             _ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             _REQUEST_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in the WAITING phase for a request.", _REQUEST_BUCKETS)
        self.inference_time = histogram("vllm:request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.", _REQUEST_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.", _REQUEST_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.", _REQUEST_BUCKETS)
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                               token_buckets)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.", token_buckets)
        self.n_param = histogram("vllm:request_params_n", "Histogram of the n request parameter.", _N_BUCKETS)
        self.max_tokens_param = histogram("vllm:request_params_max_tokens",
                                          "Histogram of the max_tokens request parameter.", token_buckets)
        self._last_token_time: dict[str, float] = {}  # request id -> time of its previous token

    @classmethod
    def for_engine(cls, model_name: str, async_llm) -> "ServerMetrics":
        """The metrics of a running AsyncLLM: its cores' stats, max_model_len and cache configuration."""
        cfg = async_llm.config
        cache = [cache_config_labels(cfg.block_size, cfg.enable_prefix_caching, e.num_blocks)
                 for e in async_llm.client.engines]
        return cls(model_name, async_llm.get_engine_stats, async_llm.max_model_len, cache)

    def observe(self, out: Union[RequestOutput, EmbeddingRequestOutput]) -> None:
        """Record one output (called for every output, on the engine thread)."""
        if isinstance(out, EmbeddingRequestOutput):
            self._observe_embedding(out)
            return
        rid, m = out.request_id, out.metrics
        new_tokens = sum(len(d) for d in out.delta_token_ids)
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
        if m is not None and new_tokens and m.last_token_time is not None:
            prev = self._last_token_time.get(rid)
            if prev is None and m.first_token_time is not None:
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                self.ttft.observe(m.first_token_time - m.arrival_time)
                _observe_known(self.queue_time, m.queue_time)
            elif prev is not None and m.last_token_time > prev:
                self.itl.observe(m.last_token_time - prev)
            self._last_token_time[rid] = m.last_token_time
        if out.finished:
            self._last_token_time.pop(rid, None)
            reason = next((c.finish_reason for c in out.outputs if c.finish_reason), "abort")
            self.request_success.labels(self.model_name, reason).inc()
            self.request_prompt_tokens.observe(len(out.prompt_token_ids))
            self.request_generation_tokens.observe(sum(len(c.token_ids) for c in out.outputs))
            if m is not None:
                self.e2e.observe((m.finished_time or m.last_token_time or m.arrival_time) - m.arrival_time)
                _observe_known(self.prefill_time, m.prefill_time)
                _observe_known(self.decode_time, m.decode_time)
                _observe_known(self.inference_time, m.inference_time)
                self.n_param.observe(m.n_param)
                if m.max_tokens_param:
                    self.max_tokens_param.observe(m.max_tokens_param)

    def _observe_embedding(self, out: EmbeddingRequestOutput) -> None:
        """A pooling request: its prompt is all it has (it finishes with "stop" once its vector is out)."""
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.request_prompt_tokens.observe(len(out.prompt_token_ids))
        # (an aborted pooling request ends without a vector)
        self.request_success.labels(self.model_name, "stop" if out.outputs.embedding else "abort").inc()
        m = out.metrics
        if m is not None:
            _observe_known(self.queue_time, m.queue_time)
            _observe_known(self.prefill_time, m.prefill_time)
            _observe_known(self.inference_time, m.inference_time)
            _observe_known(self.e2e, m.e2e_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _observe_known(histogram: Histogram, value: Optional[float]) -> None:
    if value is not None:
        histogram.observe(value)
