"""`freight bench serve`: load-test any OpenAI-compatible server (freight, vLLM, llama.cpp, ...).

Like `vllm bench serve`: streaming requests arrive as a Poisson process (gamma with --burstiness),
optionally capped at --max-concurrency, and the report uses vLLM's JSON key names (mean_ttft_ms,
p99_itl_ms, output_throughput, ...) so results line up with vLLM's own. Per request it measures
TTFT (first non-empty content chunk), ITL (gaps between content chunks), TPOT and end-to-end time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from freight.benchmarks.datasets import BenchRequest, build_dataset
from freight.benchmarks.report import print_table, write_json


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def run(args) -> dict:
    if args.request_rate <= 0 or args.burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1")
    return asyncio.run(_bench(args))


async def _bench(args) -> dict:
    try:
        import httpx  # only this client needs it
    except ImportError:
        raise ValueError("`freight bench serve` needs httpx: pip install httpx") from None
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # The pool must not queue requests itself: that wait would count as server latency.
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        model, root = await _server_model(client, args.model)
        tokenizer, vocab = _tokenizer_and_vocab(args, root)
        reqs = build_dataset(args, vocab)
        work = [(_payload(args, model, r, tokenizer), len(r.prompt_ids)) for r in reqs]
        results, duration = await _send_all(client, args, work)
    result = _summarize(args, model, results, duration)
    print_table("Serving Benchmark", result)
    print(json.dumps(result))
    write_json(args.output_json, result)
    if not result["completed"]:
        raise ValueError(f"every request failed; first error: {results[0].error}")
    return result


async def _server_model(client, model: Optional[str]) -> tuple[str, Optional[str]]:
    """The model name to send and the server's model path (`root`, where it says; a tokenizer source)."""
    try:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        card = next((m for m in resp.json()["data"] if model in (None, m.get("id"))), None)
    except Exception as e:  # noqa: BLE001 - any failure here means: the server does not say
        card, why = None, f"cannot list models at {client.base_url}/v1/models ({type(e).__name__}: {e})"
    else:
        why = "the server lists no model"
    if card is None and model is None:
        raise ValueError(f"{why}; is the server up (and --api-key right)? --model names the model")
    return (card["id"], card.get("root")) if card else (model, None)


def _tokenizer_and_vocab(args, root: Optional[str]) -> tuple[Any, int]:
    """A tokenizer for text prompts (None where none is needed or none loads) and the vocabulary
    size random prompts are drawn from.

    Sources in order: --tokenizer, --model if it is a local directory, the path the server reports.
    The vocabulary is the model's config.json vocab_size where there is one, as `bench throughput`
    uses, so both draw the same token ids for the same dataset.
    """
    from freight.tokenizer import load_tokenizer

    candidates = [c for c in (args.model, root) if c and Path(c).is_dir()]
    if args.tokenizer:
        candidates.insert(0, args.tokenizer)
    vocab = next((int(json.loads(cfg.read_text()).get("vocab_size") or 0) for cfg in
                  (Path(c) / "config.json" for c in candidates) if cfg.is_file()), 0)
    needs_text = "chat/completions" in args.endpoint or args.prompt_format == "text"
    tokenizer = None
    for c in candidates if needs_text or not vocab else []:
        try:
            tokenizer = load_tokenizer(c)
            break
        except ValueError:
            if c == args.tokenizer:
                raise  # asked for by name: say why it failed
    if not vocab and tokenizer is not None:
        vocab = len(tokenizer)
    if not vocab and args.dataset_name != "jsonl":
        raise ValueError("cannot tell the model's vocabulary to draw prompts from (no tokenizer or config.json "
                         f"at {candidates or 'any known path'}); pass --tokenizer DIR")
    if needs_text and tokenizer is None:
        print("warning: no tokenizer loaded; prompts without text are sent as token ids", file=sys.stderr)
    return tokenizer, vocab


def _payload(args, model: str, r: BenchRequest, tokenizer) -> dict:
    chat = "chat/completions" in args.endpoint
    body: dict[str, Any] = {"model": model, "max_tokens": r.output_len, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
    # Token ids give exact prompt lengths; text is re-tokenized by the server and may drift.
    if not chat and r.prompt_ids and (args.prompt_format == "ids" or (tokenizer is None and r.prompt is None)):
        body["prompt"] = r.prompt_ids
        return body
    if r.prompt is not None:
        text = r.prompt
    elif tokenizer is not None:
        text = tokenizer.decode(r.prompt_ids)
    else:
        raise ValueError("chat prompts need text: pass --tokenizer DIR to turn the token ids into text")
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return body


def _arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds between arrivals: gamma(shape=burstiness) with mean 1/rate; burstiness 1 is Poisson."""
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]


async def _send_all(client, args, work: list[tuple[dict, int]]) -> tuple[list[RequestResult], float]:
    from tqdm import tqdm

    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = tqdm(total=len(work), disable=args.disable_tqdm, file=sys.stderr)

    async def one(body: dict, prompt_len: int) -> RequestResult:
        res = RequestResult(prompt_len)
        async with sem or contextlib.nullcontext():
            try:
                await asyncio.wait_for(_stream(client, args.endpoint, body, res), args.timeout)
            except asyncio.TimeoutError:
                res.success, res.error = False, f"timed out after {args.timeout}s"
            except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
                res.success, res.error = False, f"{type(e).__name__}: {e}"
        bar.update(1)
        return res

    gaps = _arrival_gaps(len(work), args.request_rate, args.burstiness, args.seed)
    start = time.perf_counter()
    tasks = []
    for i, (body, prompt_len) in enumerate(work):
        tasks.append(asyncio.create_task(one(body, prompt_len)))
        if i + 1 < len(work) and gaps[i]:
            await asyncio.sleep(gaps[i])
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


async def _stream(client, endpoint: str, body: dict, res: RequestResult) -> None:
    """Send one streaming request and fill `res` from its server-sent events."""
    chunks, usage_tokens = 0, 0
    start = last = time.perf_counter()
    async with client.stream("POST", endpoint, json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            res.error = f"HTTP {resp.status_code}: {text[:300]}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("error"):  # an error after the stream started
                err = event["error"]
                res.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                return
            now = time.perf_counter()
            if _content(event):
                if chunks == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last, chunks = now, chunks + 1
            usage = event.get("usage")
            if usage:
                usage_tokens = usage.get("completion_tokens") or usage_tokens
                res.prompt_len = usage.get("prompt_tokens") or res.prompt_len
    res.e2e = time.perf_counter() - start
    if chunks == 0:
        res.ttft = res.e2e  # nothing but empty text came back: the first token was as late as the end
    res.output_tokens = usage_tokens or chunks
    res.success = True


def _content(event: dict) -> str:
    """The text a completion or chat chunk carries ('' for role-only, finish-only and usage chunks)."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return c.get("text") or (c.get("delta") or {}).get("content") or ""


def _summarize(args, model: str, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    rate = args.request_rate
    result: dict[str, Any] = {
        "benchmark": "serve", "base_url": args.base_url, "endpoint": args.endpoint, "model_id": model,
        "dataset": args.dataset_name, "num_prompts": len(results),
        "request_rate": "inf" if rate == float("inf") else rate,  # JSON has no Infinity
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "duration": round(duration, 3), "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": round(len(ok) / duration, 4),
        "output_throughput": round(total_out / duration, 2),
        "total_token_throughput": round((total_in + total_out) / duration, 2),
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
    result["errors"] = list(dict.fromkeys(r.error for r in results if not r.success))[:5]
    return result
