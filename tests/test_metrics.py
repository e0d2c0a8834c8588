"""/metrics: parses with prometheus_client's parser, has vLLM's names labelled with the model
name, and its counters and histograms move as requests run."""

from __future__ import annotations

import httpx

from server_utils import SERVED_NAME, chat_model_dir, metric, scrape, server, wait_for_idle  # noqa: F401

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
