"""`freight bench soak` against a real server: ~2000 mixed requests (completions and chat,
streamed and not, n 1-2, logprobs, stop strings) with 20% of them abandoned by the client
mid-request. Every other response must be well-formed, nothing may be a 5xx, the server
must go back to idle (nothing running or waiting, every KV block free) and neither the API
process nor the engine core may grow in memory. Also: the CLI entry point, and the checks
themselves on hand-made bad responses (so a pass means something)."""

from __future__ import annotations

import asyncio
import json

import psutil
import pytest

from freight.benchmarks.soak import SoakConfig, is_idle, parse_metrics, run_soak
from freight.benchmarks.soak_checks import Malformed, Plan, StreamCheck, check_full
from freight.cli.main import main
from server_utils import (chat_model_dir, clean_server, core_pids, free_port, metric, scrape,  # noqa: F401
                          wait_for_idle)

MiB = 2**20


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.fixture(scope="module")
def soak_server(chat_model_dir, tmp_path_factory):  # noqa: F811
    with clean_server(chat_model_dir, ["--disable-log-requests", "--disable-uvicorn-access-log", "--max-num-seqs",
                                       "32"], tmp_path_factory.mktemp("soak") / "server.log") as srv:
        yield srv


def test_soak_2000_requests_with_aborts(soak_server):
    srv = soak_server
    (core,) = core_pids(srv)
    aborts_before = metric(scrape(srv), "vllm:request_success_total", finished_reason="abort")
    core_rss: list[int] = []
    # The engine core grows by 100-250 MiB over its first ~1000 varied requests, then by a few MiB per
    # thousand, levelling off: caches keyed by step shapes fill (about half of it is oneDNN's primitive
    # cache, one entry per matmul shape, 1024 by default). It is not per request: with identical requests
    # (one prompt, one length) the core stays flat over 3000+. So the memory baseline is taken after 30%
    # of the requests (~40 MiB of growth follows), not after 5%.
    cfg = SoakConfig(base_url=srv.base_url, num_requests=2000, concurrency=32, abort_fraction=0.2, max_tokens=16,
                     seed=1, timeout=100, idle_timeout=20, warmup_fraction=0.3)
    r = asyncio.run(run_soak(cfg, on_warmup=lambda: core_rss.append(rss(core))))
    core_rss.append(rss(core))
    print(json.dumps({k: v for k, v in r.items() if k != "examples"}), "engine core RSS MiB:",
          [round(x / MiB, 1) for x in core_rss])
    assert r["examples"] == [], json.dumps(r["examples"], indent=1)
    assert r["endpoints"] == ["/v1/completions", "/v1/chat/completions"]
    assert r["sent"] == 2000 and r["completed"] + r["aborted"] == 2000
    assert (r["malformed"], r["server_error"], r["transport_error"], r["timed_out"]) == (0, 0, 0, 0)
    assert not any(s.startswith("5") for s in r["by_status"]), r["by_status"]
    assert 250 <= r["aborted"] <= 550, r["aborted"]  # 20% of 2000 were planned; fast ones can finish first
    assert r["idle"] is True and r["ok"] is True
    m = wait_for_idle(srv, timeout=5)
    assert metric(m, "vllm:num_requests_running") == 0 and metric(m, "vllm:num_requests_waiting") == 0
    assert metric(m, "vllm:kv_cache_usage_perc") == 0
    assert metric(m, "freight:kv_cache_free_blocks") == metric(m, "freight:kv_cache_total_blocks") > 0
    # The hang-ups reached the engine: it aborted requests (not just the client giving up on answers).
    assert metric(m, "vllm:request_success_total", finished_reason="abort") - aborts_before > 50
    # Memory: flat after the warm-up, for the API process (its own /metrics) and the engine core.
    assert r["rss_start_mib"] and r["rss_end_mib"]
    assert r["rss_end_mib"] < r["rss_start_mib"] * 1.15 + 20, (r["rss_start_mib"], r["rss_end_mib"])
    start, end = core_rss
    assert end < start * 1.15 + 20 * MiB, (start / MiB, end / MiB)


def test_soak_cli(soak_server, tmp_path):
    out = tmp_path / "soak.json"
    rc = main(["bench", "soak", "--base-url", soak_server.base_url, "--num-requests", "24", "--concurrency", "4",
               "--max-tokens", "4", "--seed", "7", "--output-json", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0, r
    assert r["benchmark"] == "soak" and r["sent"] == 24 and r["completed"] + r["aborted"] == 24
    assert r["malformed"] == 0 and r["idle"] is True and r["ok"] is True
    assert r["model_id"] and r["p50_latency_ms"] <= r["p99_latency_ms"] and r["requests_per_s"] > 0


def test_soak_cli_without_server_fails(tmp_path):
    out = tmp_path / "soak.json"
    assert main(["bench", "soak", "--base-url", f"http://127.0.0.1:{free_port()}", "--num-requests", "2",
                 "--output-json", str(out)]) == 1
    assert not out.exists()


# -- the checks themselves -------------------------------------------------------------
def plan(chat=False, stream=False, n=1, stops=(), **body) -> Plan:
    body = dict(dict(model="m", max_tokens=4, stream=stream), **body)
    return Plan(0, chat, body, n, list(stops))


USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
GOOD = {"choices": [{"index": 0, "text": "a b", "finish_reason": "length"}], "usage": USAGE}


@pytest.mark.parametrize("body, problem", [
    ({"choices": [], "usage": USAGE}, "expected 1 choice"),
    ({**GOOD, "choices": [{"index": 0, "text": "a", "finish_reason": None}]}, "finish_reason"),
    ({**GOOD, "choices": [{"index": 1, "text": "a", "finish_reason": "stop"}]}, "indexes"),
    ({**GOOD, "usage": {**USAGE, "total_tokens": 8}}, "total_tokens"),
    ({**GOOD, "usage": {**USAGE, "completion_tokens": 9, "total_tokens": 12}}, "over n \\* max_tokens"),
    ({"choices": GOOD["choices"]}, "usage"),
    ({"error": {"message": "x"}}, "'error'"),
])
def test_full_response_checks(body, problem):
    check_full(plan(), GOOD)
    with pytest.raises(Malformed, match=problem):
        check_full(plan(), body)


def test_full_response_stop_and_chat_checks():
    with pytest.raises(Malformed, match="stop string"):
        check_full(plan(stops=[" b"]), GOOD)
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}],
            "usage": USAGE}
    check_full(plan(chat=True), chat)
    with pytest.raises(Malformed, match="message"):
        check_full(plan(chat=True), {**chat, "choices": [{**chat["choices"][0], "message": {"role": "user"}}]})
    with pytest.raises(Malformed, match="logprobs"):
        check_full(plan(logprobs=2), GOOD)


def stream_lines(*events) -> list[str]:
    return [e if isinstance(e, str) else "data: " + json.dumps(e) for e in events]


def run_stream(p: Plan, lines: list[str]) -> None:
    check = StreamCheck(p)
    for line in lines:
        check.line(line)
    check.end()


def chunk(text="a", index=0, finish=None):
    return {"choices": [{"index": index, "text": text, "finish_reason": finish}]}


@pytest.mark.parametrize("lines, problem", [
    (stream_lines(chunk(), chunk(finish="length")), "without \\[DONE\\]"),
    (stream_lines(chunk(), "data: [DONE]", chunk(finish="stop")), "after \\[DONE\\]"),
    (stream_lines(chunk(), "data: {not json", "data: [DONE]"), "not JSON"),
    (stream_lines(chunk(), {"error": {"message": "boom"}}, "data: [DONE]"), "error event"),
    (stream_lines(chunk(), "data: [DONE]"), "never got a finish_reason"),
    (stream_lines(chunk(finish="stop"), chunk(), "data: [DONE]"), "after its finish_reason"),
    (stream_lines(chunk(index=3, finish="stop"), "data: [DONE]"), "out of range"),
    (stream_lines(chunk(finish="abort"), "data: [DONE]"), "finish_reason is 'abort'"),
])
def test_stream_checks(lines, problem):
    run_stream(plan(stream=True), stream_lines(chunk(), chunk(finish="length"), "", "data: [DONE]"))
    with pytest.raises(Malformed, match=problem):
        run_stream(plan(stream=True), lines)


def test_stream_usage_and_stop_checks():
    p = plan(stream=True, stream_options={"include_usage": True})
    run_stream(p, stream_lines(chunk(finish="length"), {"choices": [], "usage": USAGE}, "data: [DONE]"))
    with pytest.raises(Malformed, match="usage chunk"):
        run_stream(p, stream_lines(chunk(finish="length"), "data: [DONE]"))
    with pytest.raises(Malformed, match="stop string"):
        run_stream(plan(stream=True, stops=["ab"]), stream_lines(chunk("a"), chunk("b", finish="stop"),
                                                                  "data: [DONE]"))


def test_metrics_parsing_and_idle():
    text = ('# HELP vllm:num_requests_running x\nvllm:num_requests_running{engine="0",model_name="m"} 0.0\n'
            'vllm:num_requests_running{engine="1",model_name="m"} 2.0\nvllm:num_requests_waiting{engine="0"} 0\n'
            'freight:kv_cache_free_blocks{engine="0"} 10\nfreight:kv_cache_total_blocks{engine="0"} 10\n'
            'process_resident_memory_bytes 1.048576e+08\n')
    m = parse_metrics(text)
    assert m["vllm:num_requests_running"] == 2 and m["process_resident_memory_bytes"] == 100 * MiB
    assert is_idle(m) is False
    assert is_idle({**m, "vllm:num_requests_running": 0}) is True
    assert is_idle({**m, "vllm:num_requests_running": 0, "freight:kv_cache_free_blocks": 9}) is False
    assert is_idle({}) is None
