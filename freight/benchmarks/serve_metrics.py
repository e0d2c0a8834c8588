"""What `freight bench serve` measured, summed up under `vllm bench serve`'s JSON keys.

The report has two parts, as vLLM's:
- the summary: counts, throughputs, mean/median/std/percentiles of TTFT, TPOT, ITL and E2EL in
  milliseconds, peak output tokens/s and peak concurrency (one-second buckets, as vLLM counts them);
- per-request lists (input_lens, output_lens, ttfts, itls, generated_texts, errors; times in
  seconds, an empty error for a success), which vLLM writes only with --save-detailed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

DETAIL_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors")


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    start: float = 0.0          # time.perf_counter() when it was sent
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    generated_text: str = ""
    error: str = ""


def backend_name(endpoint: str) -> str:
    """vLLM's --backend for the endpoint freight sends to."""
    return "openai-chat" if "chat/completions" in endpoint else "openai"


def summarize(args, model: str, tokenizer_id: str, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    rate = args.request_rate
    backend = backend_name(args.endpoint)
    peak_tokens, peak_concurrency = peaks(ok)
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": backend, "endpoint_type": backend,
        "benchmark": "serve", "base_url": args.base_url, "endpoint": args.endpoint, "model_id": model,
        "tokenizer_id": tokenizer_id, "dataset": args.dataset_name, "num_prompts": len(results),
        "request_rate": "inf" if rate == float("inf") else rate,  # JSON has no Infinity
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "duration": round(duration, 3), "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": round(len(ok) / duration, 4),
        "output_throughput": round(total_out / duration, 2),
        "total_token_throughput": round((total_in + total_out) / duration, 2),
        "max_output_tokens_per_s": peak_tokens, "max_concurrent_requests": peak_concurrency,
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.e2e for r in ok],
    }
    percentiles = [float(p) for p in args.percentiles.split(",") if p.strip()]
    for name, values in series.items():
        ms = np.array(values or [0.0]) * 1000  # as vLLM: 0 rather than NaN when there is nothing to measure
        result[f"mean_{name}_ms"] = round(float(ms.mean()), 3)
        result[f"median_{name}_ms"] = round(float(np.median(ms)), 3)
        result[f"std_{name}_ms"] = round(float(ms.std()), 3)
        for p in percentiles:
            result[f"p{int(p) if p == int(p) else p}_{name}_ms"] = round(float(np.percentile(ms, p)), 3)
    result["distinct_errors"] = list(dict.fromkeys(r.error for r in results if not r.success))[:5]
    return result


def details(results: list[RequestResult]) -> dict[str, list]:
    """vLLM's per-request lists, one entry per request in the order they were sent."""
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens if r.success else 0 for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
    }


def peaks(ok: list[RequestResult]) -> tuple[float, int]:
    """(most output chunks in one second, most requests in flight in one second), counted as vLLM does:
    one-second buckets from the first request's start, a token at its TTFT and after each ITL gap."""
    if not ok:
        return 0.0, 0
    t0 = min(r.start for r in ok)
    seconds = int(math.ceil(max(r.start + r.e2e for r in ok) - t0)) + 1
    tokens = np.zeros(seconds)
    concurrent = np.zeros(seconds, dtype=int)
    for r in ok:
        t = r.start + r.ttft
        for gap in [0.0, *r.itl]:
            t += gap
            tokens[min(int(t - t0), seconds - 1)] += 1
        concurrent[int(r.start - t0):int(r.start + r.e2e - t0) + 1] += 1
    return float(tokens.max()), int(concurrent.max())
