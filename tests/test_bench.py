"""`freight bench throughput | latency | serve` smoke runs on stories260k with tiny sizes: each
command runs through the real CLI entry point and writes JSON with sane numbers. `serve` load-tests
the shared real server from server_utils (completions with token-id prompts, chat with text made
by the tokenizer the server's model path points at, a rejected API key)."""

from __future__ import annotations

import json
import re
import statistics

import pytest

from freight.benchmarks.serve import _arrival_gaps
from freight.benchmarks.serve_metrics import DETAIL_KEYS, RequestResult, peaks
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
    # `vllm bench throughput --output-json`'s keys, so scripts written for vLLM read them
    assert isinstance(r["elapsed_time"], float) and r["elapsed_time"] > 0
    assert r["total_num_tokens"] == 96 and isinstance(r["num_requests"], int)
    assert r["requests_per_second"] == pytest.approx(4 / r["elapsed_time"])
    assert r["tokens_per_second"] == pytest.approx(96 / r["elapsed_time"])
    # the KV pages the run writes were mapped before the timer started (in-process core)
    assert r["kv_cache_map_s"] is not None and r["kv_cache_map_s"] >= 0


def test_throughput_structured_output(stories_dir, tmp_path):
    """Every request constrained to the bench schema, which cannot end early: the same tokens are generated."""
    r = bench(tmp_path, "throughput", "--model", str(stories_dir), "--num-prompts", "4", *SIZES, *ENGINE,
              "--structured-output", "json")
    assert r["structured_output"] == "json" and r["generated_tokens"] == r["output_tokens"] == 32
    assert r["grammar_compiles"] == 1 and r["grammar_compile_ms_median"] > 0


def test_spec_decode_bench(tmp_path):
    """The bundled code model on input-grounded prompts: drafts are accepted and outputs match."""
    r = bench(tmp_path, "spec-decode", "--batch-sizes", "1,2", "--input-len", "64", "--output-len", "24",
              "--rounds", "1", *ENGINE)
    assert r["workload"] == "grounded" and r["speculative_config"]["method"] == "ngram"
    assert [row["batch_size"] for row in r["results"]] == [1, 2]
    for row in r["results"]:
        assert row["identical_outputs"] is True  # float32: token-identical to no speculation
        assert 0 < row["acceptance_rate"] <= 1 and row["mean_accepted_per_draft"] > 0
        assert row["base_output_tokens_per_s"] > 0 and row["spec_output_tokens_per_s"] > 0


def test_bitmask(tmp_path):
    r = bench(tmp_path, "bitmask", "--rows", "3", "--vocab-size", "100", "--iters", "2")
    for key in ("xgrammar_ms_half", "freight_ms_half", "freight_torch_ms_sparse"):
        assert r[key] > 0


def test_allreduce(tmp_path):
    from freight.distributed.shm_comm import ShmCommunicator

    if not ShmCommunicator.available():
        pytest.skip("shm_comm C kernel unavailable (no C compiler, FREIGHT_DISABLE_C_KERNELS=1 or no /dev/shm)")
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
    # `vllm bench latency --output-json`'s keys: seconds, percentiles keyed by their number
    assert len(r["latencies"]) == 2 and all(isinstance(x, float) and x > 0 for x in r["latencies"])
    assert r["avg_latency"] == pytest.approx(statistics.mean(r["latencies"]))
    assert r["percentiles"]["10"] <= r["percentiles"]["50"] <= r["percentiles"]["99"] <= max(r["latencies"])


def test_serve_completions(server, tmp_path):
    r = bench(tmp_path, "serve", "--base-url", server.base_url, "--api-key", API_KEY, "--num-prompts", "4",
              *SIZES, "--disable-tqdm")
    assert r["model_id"] == SERVED_NAME
    assert (r["completed"], r["failed"], r["distinct_errors"]) == (4, 0, [])
    # Token-id prompts: the server sees exactly the dataset's lengths; ignore_eos gives every token.
    assert r["total_input_tokens"] == 64 and r["total_output_tokens"] == 32
    assert r["duration"] > 0 and r["request_throughput"] > 0 and r["output_throughput"] > 0
    assert 0 < r["median_ttft_ms"] <= r["p99_ttft_ms"] <= r["mean_e2el_ms"] * 4
    assert r["mean_tpot_ms"] > 0 and r["mean_itl_ms"] > 0
    assert r["mean_ttft_ms"] < r["mean_e2el_ms"]
    check_vllm_serve_keys(r, num_prompts=4, output_len=8)
    assert r["backend"] == r["endpoint_type"] == "openai" and r["request_rate"] == "inf"
    assert r["input_lens"] == [16] * 4 and r["errors"] == [""] * 4


def check_vllm_serve_keys(r: dict, num_prompts: int, output_len: int) -> None:
    """The keys and types `vllm bench serve --save-result --save-detailed` writes, for a run where all succeed."""
    assert re.fullmatch(r"\d{8}-\d{6}", r["date"])
    assert isinstance(r["model_id"], str) and isinstance(r["tokenizer_id"], str) and r["tokenizer_id"]
    assert r["num_prompts"] == r["completed"] == num_prompts
    for key in ("duration", "request_throughput", "output_throughput", "total_token_throughput"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert isinstance(r["total_input_tokens"], int) and r["total_output_tokens"] == num_prompts * output_len
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std"):
            assert isinstance(r[f"{stat}_{metric}_ms"], float) and r[f"{stat}_{metric}_ms"] >= 0, (stat, metric)
        assert r[f"mean_{metric}_ms"] > 0, metric
    assert all(len(r[k]) == num_prompts for k in DETAIL_KEYS)
    assert r["output_lens"] == [output_len] * num_prompts and sum(r["input_lens"]) == r["total_input_tokens"]
    assert all(isinstance(t, float) and t > 0 for t in r["ttfts"]), r["ttfts"]
    # a gap per content chunk after the first (a token may bring no text yet, or two arrive in one chunk)
    assert all(0 < len(gaps) < output_len and all(g >= 0 for g in gaps) for gaps in r["itls"]), r["itls"]
    assert all(isinstance(t, str) and t for t in r["generated_texts"]), r["generated_texts"]
    assert output_len <= r["max_output_tokens_per_s"] <= num_prompts * output_len
    assert isinstance(r["max_concurrent_requests"], int) and 1 <= r["max_concurrent_requests"] <= num_prompts


def test_serve_chat_rate_and_concurrency(server, tmp_path):
    r = bench(tmp_path, "serve", "--base-url", server.base_url, "--api-key", API_KEY, "--endpoint",
              "/v1/chat/completions", "--num-prompts", "4", *SIZES, "--request-rate", "50", "--burstiness", "2",
              "--max-concurrency", "2", "--metric-percentiles", "50,99.9", "--disable-tqdm")
    assert (r["completed"], r["failed"]) == (4, 0)
    assert r["total_output_tokens"] == 32 and r["total_input_tokens"] > 0
    assert r["max_concurrency"] == 2 and r["request_rate"] == 50
    assert r["p99.9_ttft_ms"] >= r["p50_ttft_ms"] > 0
    check_vllm_serve_keys(r, num_prompts=4, output_len=8)
    assert r["backend"] == "openai-chat"


@pytest.mark.parametrize("detailed", [False, True])
def test_serve_save_result(server, tmp_path, detailed):
    """--save-result names the file as vLLM does; the per-request lists only with --save-detailed."""
    argv = ["bench", "serve", "--base-url", server.base_url, "--api-key", API_KEY, "--num-prompts", "2", *SIZES,
            "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path / "results")]
    assert main(argv + (["--save-detailed"] if detailed else [])) == 0
    (path,) = (tmp_path / "results").iterdir()
    assert re.fullmatch(rf"openai-infqps-{SERVED_NAME}-\d{{8}}-\d{{6}}\.json", path.name), path.name
    r = json.loads(path.read_text())
    assert r["completed"] == 2 and r["max_output_tokens_per_s"] > 0
    assert all((k in r) == detailed for k in DETAIL_KEYS)
    if detailed:
        check_vllm_serve_keys(r, num_prompts=2, output_len=8)


def test_serve_counts_failed_requests(server, chat_model_dir, tmp_path):  # noqa: F811
    # --model and --tokenizer stand in for the model list the wrong key cannot read.
    r = bench(tmp_path, "serve", "--base-url", server.base_url, "--api-key", "wrong", "--model", SERVED_NAME,
              "--tokenizer", str(chat_model_dir), "--num-prompts", "2", *SIZES, "--disable-tqdm", rc=1)
    assert (r["completed"], r["failed"]) == (0, 2)
    assert len(r["errors"]) == 2 and all(e.startswith("HTTP 401") for e in r["errors"])
    assert r["distinct_errors"] == r["errors"][:1] and r["output_lens"] == [0, 0]
    assert (r["max_output_tokens_per_s"], r["max_concurrent_requests"]) == (0.0, 0)


def test_arrival_gaps():
    assert _arrival_gaps(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]
    for burstiness in (0.5, 1.0, 4.0):
        gaps = _arrival_gaps(4000, 10.0, burstiness, 0)
        assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.1)
    # Lower burstiness: the same mean rate in more uneven gaps.
    assert statistics.stdev(_arrival_gaps(4000, 10.0, 0.5, 0)) > statistics.stdev(_arrival_gaps(4000, 10.0, 4.0, 0))


def test_peaks_count_one_second_buckets_as_vllm():
    """Two requests from t=10.0: a at 10.2, 10.5, 11.1 s; b at 10.9 and 11.1 s. Bucket 0 has 3 tokens,
    bucket 1 has 2; both requests run in bucket 0 and 1, only b (to 12.5 s) in bucket 2."""
    a = RequestResult(4, success=True, output_tokens=3, start=10.0, ttft=0.2, e2e=1.2, itl=[0.3, 0.6])
    b = RequestResult(4, success=True, output_tokens=2, start=10.5, ttft=0.4, e2e=2.0, itl=[0.2])
    assert peaks([a, b]) == (3.0, 2)
    assert peaks([b]) == (2.0, 1)
    assert peaks([]) == (0.0, 0)
