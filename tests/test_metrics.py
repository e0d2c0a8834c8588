"""/metrics: parses with prometheus_client's parser, has vLLM's names labelled with the model
name, and its counters and histograms move as requests run."""

from __future__ import annotations

import json
import re

import httpx

from server_utils import (REPO_ROOT, SERVED_NAME, chat_model_dir, metric, scrape, server,  # noqa: F401
                          wait_for_idle)

COUNTERS = ["vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
            "vllm:prompt_tokens_total", "vllm:generation_tokens_total"]
GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]
HISTOGRAMS = ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"]


def complete(server, prompt, max_tokens):
    r = httpx.post(server.url("/v1/completions"), headers=server.headers(), timeout=60,
                   json={"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_names_and_labels(server):
    complete(server, "Hi", 2)  # so the labelled request_success series exists
    m = wait_for_idle(server)
    names = {n for n, _ in m}
    for name in COUNTERS + GAUGES + ["vllm:request_success_total"]:
        assert name in names, name
    for name in HISTOGRAMS:
        assert {f"{name}_bucket", f"{name}_count", f"{name}_sum"} <= names, name
    for (name, labels), _ in m.items():
        if name.startswith("vllm:"):
            assert ("model_name", SERVED_NAME) in labels, (name, labels)
    assert 0.0 <= metric(m, "vllm:kv_cache_usage_perc") <= 1.0


def test_counters_move(server):
    before = wait_for_idle(server)
    resp = complete(server, "Once upon a time, there was a little girl named Lily", 7)
    p = resp["usage"]["prompt_tokens"]
    after = wait_for_idle(server)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("vllm:prompt_tokens_total") == p
    assert delta("vllm:generation_tokens_total") == 7
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:prefix_cache_queries_total") == p
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:e2e_request_latency_seconds_count") == 1
    assert delta("vllm:request_queue_time_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") == 6
    assert delta("vllm:e2e_request_latency_seconds_sum") > 0


def test_prefix_cache_hits(server):
    prompt = " ".join(["the cat sat on the mat"] * 8)  # several full 16-token blocks
    complete(server, prompt, 2)
    before = wait_for_idle(server)
    complete(server, prompt, 2)
    after = wait_for_idle(server)
    hits = metric(after, "vllm:prefix_cache_hits_total") - metric(before, "vllm:prefix_cache_hits_total")
    assert hits >= 32


def test_gauges_while_running(server):
    body = {"model": SERVED_NAME, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", server.url("/v1/completions"), json=body,
                                                  headers=server.headers()) as r:
        lines = r.iter_lines()  # kept referenced: a closed iterator would close the connection
        while not next(lines).startswith("data: "):
            pass
        m = scrape(server)
        assert metric(m, "vllm:num_requests_running") == 1
        assert 0 < metric(m, "vllm:kv_cache_usage_perc") <= 1
        assert metric(m, "freight:kv_cache_free_blocks") < metric(m, "freight:kv_cache_total_blocks")
    m = wait_for_idle(server)
    assert metric(m, "vllm:num_requests_running") == 0 and metric(m, "vllm:kv_cache_usage_perc") == 0


# -- the request histograms, tokens per step, cache configuration, the Grafana dashboard ----------
def delta_of(before, after):
    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)
    return delta


def test_request_histograms(server):
    before = wait_for_idle(server)
    r = httpx.post(server.url("/v1/completions"), headers=server.headers(), timeout=60,
                   json={"model": SERVED_NAME, "prompt": "Once upon a time, in a big forest", "max_tokens": 5,
                         "n": 2, "temperature": 1.0, "seed": 7, "ignore_eos": True})
    assert r.status_code == 200, r.text
    p = r.json()["usage"]["prompt_tokens"]
    delta = delta_of(before, wait_for_idle(server))
    for name in ["vllm:request_params_n", "vllm:request_params_max_tokens", "vllm:request_prompt_tokens",
                 "vllm:request_generation_tokens", "vllm:request_prefill_time_seconds",
                 "vllm:request_decode_time_seconds", "vllm:request_inference_time_seconds"]:
        assert delta(f"{name}_count") == 1, name  # one request (of two sequences)
    assert delta("vllm:request_params_n_sum") == 2
    assert delta("vllm:request_params_n_bucket", le="1.0") == 0 and delta("vllm:request_params_n_bucket", le="2.0") == 1
    assert delta("vllm:request_params_max_tokens_sum") == 5
    assert delta("vllm:request_prompt_tokens_sum") == p
    assert delta("vllm:request_generation_tokens_sum") == 10
    prefill, decode = delta("vllm:request_prefill_time_seconds_sum"), delta("vllm:request_decode_time_seconds_sum")
    assert prefill > 0 and decode > 0
    assert abs(prefill + decode - delta("vllm:request_inference_time_seconds_sum")) < 1e-6
    assert delta("vllm:request_inference_time_seconds_sum") <= delta("vllm:e2e_request_latency_seconds_sum")


def test_iteration_tokens(server):
    """Tokens per engine step add up to the prompt tokens computed (not those found in the prefix cache)
    plus the tokens generated; one request alone takes one step per generated token."""
    before = wait_for_idle(server)
    r = httpx.post(server.url("/v1/completions"), headers=server.headers(), timeout=60,
                   json={"model": SERVED_NAME, "prompt": "A green frog jumped into the pond and", "max_tokens": 6,
                         "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    delta = delta_of(before, wait_for_idle(server))
    computed_prompt = u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"]
    assert delta("vllm:iteration_tokens_total_sum") == computed_prompt + u["completion_tokens"]
    assert delta("vllm:iteration_tokens_total_count") == u["completion_tokens"] == 6
    assert delta("vllm:iteration_tokens_total_bucket", le="1.0") == 5  # the decode steps
    assert delta("vllm:iteration_tokens_total_bucket", le="+Inf") == 6


def test_cache_config_info(server):
    m = wait_for_idle(server)
    infos = [dict(labels) for (name, labels), value in m.items() if name == "vllm:cache_config_info" and value == 1]
    assert len(infos) == 1, infos
    info = infos[0]
    assert info["engine"] == "0" and info["block_size"] == "16" and info["enable_prefix_caching"] == "True"
    assert info["cache_dtype"] == "auto"
    assert int(info["num_gpu_blocks"]) == metric(m, "freight:kv_cache_total_blocks") > 0


DASHBOARD = REPO_ROOT / "examples" / "grafana" / "freight-dashboard.json"
_METRIC_NAME = re.compile(r"\b(?:vllm|freight):[A-Za-z0-9_:]+")


def dashboard_metric_names() -> set[str]:
    """Every metric name in the dashboard's PromQL (panel targets and template variable queries)."""
    names: set[str] = set()

    def walk(node, key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and key in ("expr", "query", "definition"):
            names.update(_METRIC_NAME.findall(node))

    walk(json.loads(DASHBOARD.read_text()))
    return names


def test_dashboard_uses_only_exported_metrics(server):
    complete(server, "Hi", 2)  # so the labelled series (finish reasons) exist
    exported = {name for name, _ in wait_for_idle(server)}
    used = dashboard_metric_names()
    assert len(used) >= 20, sorted(used)
    missing = sorted(used - exported)
    assert not missing, f"the dashboard queries metrics /metrics does not export: {missing}"


def test_embedding_requests_observed():
    """An embedding request counts as a finished request with its prompt tokens and its phases
    (ServerMetrics directly: no server needed)."""
    from prometheus_client.parser import text_string_to_metric_families

    from freight.core.stats import SchedulerStats
    from freight.metrics import ServerMetrics
    from freight.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestMetrics

    metrics = ServerMetrics("emb", lambda: [SchedulerStats()], max_model_len=128)
    t = 1000.0
    timeline = RequestMetrics(arrival_time=t, first_scheduled_time=t + 0.01, first_token_time=t + 0.05,
                              last_token_time=t + 0.05, finished_time=t + 0.05)
    metrics.observe(EmbeddingRequestOutput("e1", EmbeddingOutput([0.5, 0.5]), [1, 2, 3], True, None, timeline))
    m = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert metric(m, "vllm:prompt_tokens_total") == 3
    assert metric(m, "vllm:request_prompt_tokens_sum") == 3
    assert metric(m, "vllm:request_success_total", finished_reason="stop") == 1
    assert abs(metric(m, "vllm:request_queue_time_seconds_sum") - 0.01) < 1e-9
    assert abs(metric(m, "vllm:request_prefill_time_seconds_sum") - 0.04) < 1e-9
    assert abs(metric(m, "vllm:e2e_request_latency_seconds_sum") - 0.05) < 1e-9
    assert metric(m, "vllm:generation_tokens_total") == 0
