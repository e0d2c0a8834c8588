"""`freight bench throughput | latency | serve` smoke runs on stories260k with tiny sizes: each
command runs through the real CLI entry point and writes JSON with sane numbers. `serve` load-tests
the shared real server from server_utils (completions with token-id prompts, chat with text made
by the tokenizer the server's model path points at, a rejected API key)."""

from __future__ import annotations

import json
import statistics

import pytest

from freight.benchmarks.serve import _arrival_gaps
from freight.cli.main import main
from server_utils import API_KEY, SERVED_NAME, chat_model_dir, server  # noqa: F401

ENGINE = ["--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB", "--num-threads", "1"]
SIZES = ["--input-len", "16", "--output-len", "8"]


def bench(tmp_path, *argv: str, rc: int = 0) -> dict:
    out = tmp_path / "result.json"
    assert main(["bench", *argv, "--output-json", str(out)]) == rc
    return json.loads(out.read_text())


def test_throughput(stories_dir, tmp_path):
    r = bench(tmp_path, "throughput", "--model", str(stories_dir), "--num-prompts", "4", *SIZES, *ENGINE)
    assert r["num_requests"] == 4 and r["prompt_tokens"] == 64 and r["output_tokens"] == 32
    assert r["elapsed_s"] > 0 and r["output_tokens_per_s"] > 0 and r["preemptions"] == 0


def test_throughput_structured_output(stories_dir, tmp_path):
    """Every request constrained to the bench schema, which cannot end early: the same tokens are generated."""
    r = bench(tmp_path, "throughput", "--model", str(stories_dir), "--num-prompts", "4", *SIZES, *ENGINE,
              "--structured-output", "json")
    assert r["structured_output"] == "json" and r["generated_tokens"] == r["output_tokens"] == 32
    assert r["grammar_compiles"] == 1 and r["grammar_compile_ms_median"] > 0


def test_bitmask(tmp_path):
    r = bench(tmp_path, "bitmask", "--rows", "3", "--vocab-size", "100", "--iters", "2")
    for key in ("xgrammar_ms_half", "freight_ms_half", "freight_torch_ms_sparse"):
        assert r[key] > 0


def test_allreduce(tmp_path):
    r = bench(tmp_path, "allreduce", "--sizes", "8,3000", "--iters", "3")
    assert [row["elements"] for row in r["results"]] == [8, 3000]
    assert all(row["gloo_us"] > 0 and row["shm_us"] > 0 for row in r["results"])


def test_latency(stories_dir, tmp_path):
    r = bench(tmp_path, "latency", "--model", str(stories_dir), "--batch-size", "4", *SIZES, "--num-iters", "2",
              "--num-iters-warmup", "1", *ENGINE)
    assert len(r["latencies_s"]) == 2 and r["avg_latency_s"] > 0
    assert set(r["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    # 4 x 16 prompt tokens fit one step; each of the 7 later steps decodes one token per request.
    assert r["prefill_steps"] == 1 and r["decode_steps"] == 7
    assert 0 < r["prefill_s"] < r["avg_latency_s"]
    assert 0 < r["p50_decode_step_ms"] <= r["p99_decode_step_ms"] and r["mean_decode_step_ms"] > 0
    assert r["output_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0


def test_serve_completions(server, tmp_path):
    r = bench(tmp_path, "serve", "--base-url", server.base_url, "--api-key", API_KEY, "--num-prompts", "4",
              *SIZES, "--disable-tqdm")
    assert r["model_id"] == SERVED_NAME
    assert (r["completed"], r["failed"], r["errors"]) == (4, 0, [])
    # Token-id prompts: the server sees exactly the dataset's lengths; ignore_eos gives every token.
    assert r["total_input_tokens"] == 64 and r["total_output_tokens"] == 32
    assert r["duration"] > 0 and r["request_throughput"] > 0 and r["output_throughput"] > 0
    assert 0 < r["median_ttft_ms"] <= r["p99_ttft_ms"] <= r["mean_e2el_ms"] * 4
    assert r["mean_tpot_ms"] > 0 and r["mean_itl_ms"] > 0
    assert r["mean_ttft_ms"] < r["mean_e2el_ms"]


def test_serve_chat_rate_and_concurrency(server, tmp_path):
    r = bench(tmp_path, "serve", "--base-url", server.base_url, "--api-key", API_KEY, "--endpoint",
              "/v1/chat/completions", "--num-prompts", "4", *SIZES, "--request-rate", "50", "--burstiness", "2",
              "--max-concurrency", "2", "--metric-percentiles", "50,99.9", "--disable-tqdm")
    assert (r["completed"], r["failed"]) == (4, 0)
    assert r["total_output_tokens"] == 32 and r["total_input_tokens"] > 0
    assert r["max_concurrency"] == 2 and r["request_rate"] == 50
    assert r["p99.9_ttft_ms"] >= r["p50_ttft_ms"] > 0


def test_serve_counts_failed_requests(server, chat_model_dir, tmp_path):  # noqa: F811
    # --model and --tokenizer stand in for the model list the wrong key cannot read.
    r = bench(tmp_path, "serve", "--base-url", server.base_url, "--api-key", "wrong", "--model", SERVED_NAME,
              "--tokenizer", str(chat_model_dir), "--num-prompts", "2", *SIZES, "--disable-tqdm", rc=1)
    assert (r["completed"], r["failed"]) == (0, 2)
    assert r["errors"] and r["errors"][0].startswith("HTTP 401")


def test_arrival_gaps():
    assert _arrival_gaps(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]
    for burstiness in (0.5, 1.0, 4.0):
        gaps = _arrival_gaps(4000, 10.0, burstiness, 0)
        assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.1)
    # Lower burstiness: the same mean rate in more uneven gaps.
    assert statistics.stdev(_arrival_gaps(4000, 10.0, 0.5, 0)) > statistics.stdev(_arrival_gaps(4000, 10.0, 4.0, 0))
