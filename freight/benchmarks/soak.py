"""`freight bench soak`: a bounded robustness soak against a live OpenAI-compatible server.

A seeded mix of requests (completions and, where the server has a chat template, chat
completions; streamed and not; n 1 or 2; some with logprobs, some with stop strings; each
asking for 1..--max-tokens tokens) is sent with at most --concurrency in flight. A share of
them (--abort-fraction) is abandoned by the client mid-request: a stream after its first
chunk(s), a plain request after a short random delay. Every response that is not abandoned
must be a 200 with a well-formed body (see `soak_checks`); anything else
is counted as malformed (and a 5xx as a server error), with the first few kept as examples.

Afterwards /metrics is polled until the server is idle again (nothing running or waiting,
every KV block free); the report also has the API process's RSS (process_resident_memory_bytes)
after a warm-up of ~5% of the requests and at the end. Everything is bounded: the number of
requests, the concurrency, --timeout for the whole run and --idle-timeout for the wait after
it; only --base-url is contacted. The command exits 1 unless every request that was not
abandoned succeeded and the server went back to idle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from freight.benchmarks.report import print_table, write_json
from freight.benchmarks.soak_checks import Malformed, Plan, StreamCheck, check_full

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "One day, a bird",
           "Tom had a red ball", "The sun was", "Sara wanted to", "A big fish", "There was a girl named",
           "The cat and the"]
STOPS: list[Any] = [".", "\n", " the", "!", ["Lily", "Tom"], [".", "?"], "and"]
MAX_EXAMPLES = 5
EXAMPLE_CHARS = 400


@dataclass
class SoakConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: Optional[str] = None            # default: the server's first model
    num_requests: int = 2000
    concurrency: int = 32
    abort_fraction: float = 0.2
    max_tokens: int = 16
    seed: int = 0
    api_key: Optional[str] = None
    timeout: float = 600.0                 # the whole run (warm-up and requests)
    idle_timeout: float = 30.0             # the wait for the server to go idle afterwards
    warmup_fraction: float = 0.05
    abort_delay_s: float = 0.2             # a plain request is abandoned after uniform(0, this) seconds

    def check(self) -> None:
        if self.num_requests < 1 or self.concurrency < 1 or self.max_tokens < 1:
            raise ValueError("--num-requests, --concurrency and --max-tokens must be at least 1")
        if not 0.0 <= self.abort_fraction <= 1.0:
            raise ValueError("--abort-fraction must be in [0, 1]")
        if self.timeout <= 0 or self.idle_timeout < 0 or self.abort_delay_s <= 0:
            raise ValueError("--timeout and the abort delay must be positive, --idle-timeout not negative")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError("the warm-up fraction must be in [0, 1)")


@dataclass
class Outcome:
    kind: str                  # completed | aborted | malformed | server_error | transport_error | timed_out
    status: Optional[int] = None
    latency: float = 0.0
    problem: str = ""
    excerpt: str = ""


@dataclass
class _Run:
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    sent: int = 0


# -- request plans ---------------------------------------------------------------------
def make_plans(cfg: SoakConfig, model: str, chat: bool, prompt_ids: Optional[list[int]]) -> list[Plan]:
    rng = random.Random(cfg.seed)
    return [_plan(rng, i, cfg, model, chat, prompt_ids) for i in range(cfg.num_requests)]


def _plan(rng: random.Random, i: int, cfg: SoakConfig, model: str, chat: bool,
          prompt_ids: Optional[list[int]]) -> Plan:
    is_chat = chat and rng.random() < 0.5
    stream = rng.random() < 0.5
    n = 2 if rng.random() < 0.2 else 1
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(1, cfg.max_tokens)}
    temperature = rng.choice([0.0, 0.0, 0.7, 1.0])
    body["temperature"] = temperature
    if temperature and rng.random() < 0.5:
        body["seed"] = rng.randrange(2**31)
    if n > 1:
        body["n"] = n
    stops: list[str] = []
    if rng.random() < 0.25:
        stop = rng.choice(STOPS)
        body["stop"] = stop
        stops = [stop] if isinstance(stop, str) else list(stop)
    num_prompts = 1
    text = rng.choice(PROMPTS)
    if is_chat:
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < 0.2:
            body["messages"].insert(0, {"role": "system", "content": "You tell short stories."})
        if rng.random() < 0.2:
            body["logprobs"] = True
            body["top_logprobs"] = rng.randint(0, 3)
    else:
        r = rng.random()
        if r < 0.1 and prompt_ids:
            body["prompt"] = list(prompt_ids)
        elif r < 0.15:
            body["prompt"] = [text, rng.choice(PROMPTS)]
            num_prompts = 2
        else:
            body["prompt"] = text
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(1, 3)
    if stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    plan = Plan(i, is_chat, body, num_prompts * n, stops)
    if rng.random() < cfg.abort_fraction:
        if stream:
            plan.abort_after_chunks = rng.randint(1, 3)
        else:
            plan.abort_after_s = rng.uniform(0.001, cfg.abort_delay_s)
    return plan


# -- response checks -------------------------------------------------------------------
async def _send(client, plan: Plan) -> Outcome:
    start = time.perf_counter()
    if plan.stream:
        return await _send_stream(client, plan, start)
    try:
        if plan.abort_after_s:
            resp = await asyncio.wait_for(client.post(plan.path, json=plan.body), plan.abort_after_s)
        else:
            resp = await client.post(plan.path, json=plan.body)
    except asyncio.TimeoutError:
        return Outcome("aborted")
    latency = time.perf_counter() - start
    bad = _bad_status(resp.status_code, resp.text)
    if bad:
        return bad
    try:
        check_full(plan, resp.json())
    except ValueError as e:  # Malformed, and JSON errors
        return Outcome("malformed", resp.status_code, problem=str(e) if isinstance(e, Malformed) else
                       f"body is not JSON ({e})", excerpt=resp.text[:EXAMPLE_CHARS])
    return Outcome("completed", resp.status_code, latency)


async def _send_stream(client, plan: Plan, start: float) -> Outcome:
    check = StreamCheck(plan)
    seen: list[str] = []
    async with client.stream("POST", plan.path, json=plan.body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            return _bad_status(resp.status_code, text) or Outcome("malformed", resp.status_code)
        ctype = resp.headers.get("content-type", "")
        if not ctype.startswith("text/event-stream"):
            text = (await resp.aread()).decode(errors="replace")
            return Outcome("malformed", 200, problem=f"content-type {ctype!r} for a stream",
                           excerpt=text[:EXAMPLE_CHARS])
        try:
            async for line in resp.aiter_lines():
                if len(seen) < 8:
                    seen.append(line)
                check.line(line)
                if plan.abort_after_chunks and check.events >= plan.abort_after_chunks and not check.done:
                    return Outcome("aborted", 200)  # leaving the block closes the connection mid-stream
            check.end()
        except Malformed as e:
            return Outcome("malformed", 200, problem=str(e), excerpt="\n".join(seen)[:EXAMPLE_CHARS])
    return Outcome("completed", 200, time.perf_counter() - start)


def _bad_status(status: int, text: str) -> Optional[Outcome]:
    if status == 200:
        return None
    kind = "server_error" if status >= 500 else "malformed"
    return Outcome(kind, status, problem=f"HTTP {status}", excerpt=text[:EXAMPLE_CHARS])


async def _run_plans(client, plans: list[Plan], concurrency: int, deadline: float, run: _Run) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(plan: Plan) -> None:
        async with sem:
            if time.monotonic() >= deadline:
                return  # left unsent: counted as timed out
            run.sent += 1
            try:
                run.outcomes[plan.index] = await _send(client, plan)
            except asyncio.CancelledError:
                run.outcomes[plan.index] = Outcome("timed_out", problem="cancelled at the --timeout bound")
                raise
            except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
                run.outcomes[plan.index] = Outcome("transport_error", problem=f"{type(e).__name__}: {e}")

    if not plans:
        return
    tasks = [asyncio.create_task(one(p)) for p in plans]
    _, pending = await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0.0))
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=10)
    for p in plans:
        run.outcomes.setdefault(p.index, Outcome("timed_out", problem="not finished within --timeout"))


# -- the server's side ------------------------------------------------------------------
def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: sum over its label sets} (prometheus_client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


async def scrape(client) -> dict[str, float]:
    try:
        r = await client.get("/metrics", timeout=10)
        return parse_metrics(r.text) if r.status_code == 200 else {}
    except Exception:  # noqa: BLE001 - a server without /metrics: nothing to tell
        return {}


IDLE_KEYS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
             "freight:kv_cache_free_blocks", "freight:kv_cache_total_blocks")


def is_idle(m: dict[str, float]) -> Optional[bool]:
    """True/False, or None where the server does not export the gauges to tell."""
    if "vllm:num_requests_running" not in m or "vllm:num_requests_waiting" not in m:
        return None
    idle = m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    idle = idle and m.get("vllm:kv_cache_usage_perc", 0.0) == 0
    if "freight:kv_cache_free_blocks" in m and "freight:kv_cache_total_blocks" in m:
        idle = idle and m["freight:kv_cache_free_blocks"] == m["freight:kv_cache_total_blocks"]
    return idle


async def wait_idle(client, timeout: float) -> tuple[Optional[bool], float, dict[str, float]]:
    start = time.monotonic()
    while True:
        m = await scrape(client)
        idle = is_idle(m)
        if idle is None or idle or time.monotonic() - start >= timeout:
            return idle, time.monotonic() - start, m
        await asyncio.sleep(0.1)


def _rss_mib(m: dict[str, float]) -> Optional[float]:
    v = m.get("process_resident_memory_bytes")
    return round(v / 2**20, 1) if v is not None else None


async def _server_model(client, model: Optional[str]) -> str:
    if model:
        return model
    try:
        r = await client.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot list models at {client.base_url}/v1/models ({type(e).__name__}: {e}); is the "
                         "server up (and --api-key right)? --model names the model") from None


async def _has_chat(client, model: str) -> bool:
    """Whether chat completions work (a model without a chat template answers 400)."""
    try:
        r = await client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        return r.status_code == 200 and isinstance(r.json().get("choices"), list)
    except Exception:  # noqa: BLE001
        return False


async def _token_ids(client, model: str) -> Optional[list[int]]:
    """A prompt as token ids, where the server has vLLM's /tokenize (else none are sent)."""
    try:
        r = await client.post("/tokenize", json={"model": model, "prompt": PROMPTS[0]})
        ids = r.json().get("tokens") if r.status_code == 200 else None
        return ids if isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids) else None
    except Exception:  # noqa: BLE001
        return None


# -- the run --------------------------------------------------------------------------------
async def run_soak(cfg: SoakConfig, on_warmup: Optional[Callable[[], Any]] = None) -> dict:
    """Run the soak and return its report (a dict; report["ok"] is the verdict).

    `on_warmup` is called (no arguments) once the warm-up requests are done, just after
    the first RSS reading: a caller can take its own readings there.
    """
    import httpx

    cfg.check()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency + 2, max_keepalive_connections=cfg.concurrency + 2)
    started = time.monotonic()
    deadline = started + cfg.timeout
    # trust_env=False: no proxy from the environment; nothing but --base-url is contacted.
    async with httpx.AsyncClient(base_url=cfg.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(min(cfg.timeout, 300.0)), trust_env=False) as client:
        model = await _server_model(client, cfg.model)
        chat = await _has_chat(client, model)
        prompt_ids = await _token_ids(client, model)
        plans = make_plans(cfg, model, chat, prompt_ids)
        num_warmup = 0
        if cfg.warmup_fraction:
            num_warmup = min(len(plans) - 1, max(1, round(len(plans) * cfg.warmup_fraction)))
        run = _Run()
        t0 = time.perf_counter()
        await _run_plans(client, plans[:num_warmup], cfg.concurrency, deadline, run)
        duration = time.perf_counter() - t0
        # The RSS baseline is read with the server idle again (not mid-burst).
        _, _, m = await wait_idle(client, min(cfg.idle_timeout, max(deadline - time.monotonic(), 0.0)))
        rss_start = _rss_mib(m)
        if on_warmup is not None:
            on_warmup()
        t1 = time.perf_counter()
        await _run_plans(client, plans[num_warmup:], cfg.concurrency, deadline, run)
        duration += time.perf_counter() - t1  # sending time only, not the wait between the phases
        idle, idle_after, m = await wait_idle(client, cfg.idle_timeout)
        rss_end = _rss_mib(m)
    return _report(cfg, model, chat, plans, num_warmup, run, duration, idle, idle_after, m, rss_start, rss_end)


def _report(cfg: SoakConfig, model: str, chat: bool, plans: list[Plan], num_warmup: int, run: _Run,
            duration: float, idle: Optional[bool], idle_after: float, m: dict[str, float], rss_start: Optional[float],
            rss_end: Optional[float]) -> dict:
    outs = [run.outcomes[p.index] for p in plans]
    count = {k: sum(o.kind == k for o in outs) for k in
             ("completed", "aborted", "malformed", "server_error", "transport_error", "timed_out")}
    by_status: dict[str, int] = {}
    for o in outs:
        key = str(o.status) if o.status is not None else ("aborted_before_response" if o.kind == "aborted"
                                                          else "no_response")
        by_status[key] = by_status.get(key, 0) + 1
    lat_ms = np.array([o.latency for o in outs if o.kind == "completed"] or [0.0]) * 1000
    examples = [{"request": i, "endpoint": p.path, "stream": p.stream, "kind": o.kind, "status": o.status,
                 "problem": o.problem, "excerpt": o.excerpt, "body": p.body}
                for i, (p, o) in enumerate(zip(plans, outs)) if o.kind not in ("completed", "aborted")]
    failures = count["malformed"] + count["server_error"] + count["transport_error"] + count["timed_out"]
    result: dict[str, Any] = {
        "benchmark": "soak", "base_url": cfg.base_url, "model_id": model,
        "endpoints": ["/v1/completions"] + (["/v1/chat/completions"] if chat else []),
        "num_requests": cfg.num_requests, "concurrency": cfg.concurrency, "abort_fraction": cfg.abort_fraction,
        "max_tokens": cfg.max_tokens, "seed": cfg.seed, "warmup_requests": num_warmup,
        "duration": round(duration, 3), "sent": run.sent,
        **count, "by_status": dict(sorted(by_status.items())),
        "requests_per_s": round((count["completed"] + count["aborted"]) / duration, 2) if duration else 0.0,
        "p50_latency_ms": round(float(np.percentile(lat_ms, 50)), 2),
        "p99_latency_ms": round(float(np.percentile(lat_ms, 99)), 2),
        "idle": idle, "idle_after_s": round(idle_after, 2),
        "final_metrics": {k: m[k] for k in IDLE_KEYS if k in m},
        "rss_start_mib": rss_start, "rss_end_mib": rss_end,
        "rss_growth_mib": round(rss_end - rss_start, 1) if rss_start is not None and rss_end is not None else None,
        "examples": examples[:MAX_EXAMPLES],
        "ok": failures == 0 and idle is not False,
    }
    return result


def config_from_args(args) -> SoakConfig:
    return SoakConfig(base_url=args.base_url, model=args.model, num_requests=args.num_requests,
                      concurrency=args.concurrency, abort_fraction=args.abort_fraction, max_tokens=args.max_tokens,
                      seed=args.seed, api_key=args.api_key, timeout=args.timeout, idle_timeout=args.idle_timeout,
                      warmup_fraction=args.warmup_fraction)


def run(args) -> int:
    """`freight bench soak`: 0 when the soak passed, 1 when it did not."""
    result = asyncio.run(run_soak(config_from_args(args)))
    table = {k: v for k, v in result.items() if k != "examples"}
    print_table("Soak", table)
    for ex in result["examples"]:
        print(f"  {ex['kind']} (request {ex['request']}, {ex['endpoint']}, stream={ex['stream']}, "
              f"status {ex['status']}): {ex['problem']}")
    print(json.dumps(result))
    write_json(args.output_json, result)
    if result["idle"] is None:
        print("warning: the server's /metrics has no vllm:num_requests_running/waiting; idleness not checked")
    return 0 if result["ok"] else 1


