"""`freight bench serve`: load-test any OpenAI-compatible server (freight, vLLM, llama.cpp, ...).

Like `vllm bench serve`: streaming requests arrive as a Poisson process (gamma with --burstiness),
optionally capped at --max-concurrency, and the report uses vLLM's JSON keys (serve_metrics) so
results line up with vLLM's own. Per request it measures TTFT (first non-empty content chunk), ITL
(gaps between content chunks), TPOT and end-to-end time.

--output-json writes the summary and the per-request lists; --save-result writes a file named as
vLLM names it (into --result-dir), with the lists only under --save-detailed, as vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

from freight.benchmarks.datasets import BenchRequest, build_dataset
from freight.benchmarks.report import print_table, write_json
from freight.benchmarks.serve_metrics import RequestResult, backend_name, details, summarize


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
    result = summarize(args, model, args.tokenizer or root or model, results, duration)
    print_table("Serving Benchmark", result)
    print(json.dumps(result))
    full = {**result, **details(results)}
    write_json(args.output_json, full)
    if args.save_result:
        write_json(_result_path(args, result), full if args.save_detailed else result)
    if not result["completed"]:
        raise ValueError(f"every request failed; first error: {results[0].error}")
    return full


def _result_path(args, result: dict) -> str:
    """vLLM's file name for --save-result: {backend}-{rate}qps[-concurrency{N}]-{model}-{date}.json."""
    name = args.result_filename
    if not name:
        concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
        name = (f"{backend_name(args.endpoint)}-{args.request_rate}qps{concurrency}-"
                f"{result['model_id'].split('/')[-1]}-{result['date']}.json")
    if args.result_dir:
        Path(args.result_dir).mkdir(parents=True, exist_ok=True)
        return str(Path(args.result_dir) / name)
    return name


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
    start = last = res.start = time.perf_counter()
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
            text = _content(event)
            if text:
                res.generated_text += text
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
