"""`freight bench latency`: how long one batch takes end to end, split into prefill and decode steps.

Like `vllm bench latency`: one batch of --batch-size random prompts of --input-len tokens, greedy,
--output-len tokens each (ignore_eos, so every run does the same work). Beyond vLLM's numbers it
times each engine step, so the prefill (steps until every request has its first token) and the
per-step decode cost are reported apart.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from freight.benchmarks.datasets import random_requests
from freight.benchmarks.report import peak_memory_mib, print_table, write_json

logger = logging.getLogger(__name__)

LATENCY_PERCENTILES = (10, 25, 50, 75, 90, 99)  # the ones `vllm bench latency` reports
STEP_PERCENTILES = (50, 90, 99)


@dataclass
class Iteration:
    total_s: float
    prefill_s: float            # steps until every request had its first token
    prefill_steps: int
    decode_steps_s: list[float]  # each step after that
    decode_tokens: int          # tokens those steps produced


def run(args) -> dict:
    from freight.cli.engine_args import engine_config_from_args
    from freight.engine.llm_engine import LLMEngine
    from freight.sampling_params import SamplingParams

    if args.batch_size < 1 or args.input_len < 1 or args.output_len < 1 or args.num_iters < 1:
        raise ValueError("--batch-size, --input-len, --output-len and --num-iters must be at least 1")
    t0 = time.perf_counter()
    engine = LLMEngine(engine_config_from_args(args), args.data_parallel_size)
    startup = time.perf_counter() - t0
    reqs = random_requests(args.batch_size, args.input_len, args.output_len, 0.0, engine.model_config.vocab_size,
                           args.seed)
    prompts = [r.prompt_ids for r in reqs]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for _ in range(args.num_iters_warmup):
        _run_batch(engine, prompts, params)
    iters = [_run_batch(engine, prompts, params) for _ in range(args.num_iters)]

    latencies = np.array([it.total_s for it in iters])
    avg = float(latencies.mean())
    steps_ms = np.array([s for it in iters for s in it.decode_steps_s]) * 1000
    decode_s = sum(sum(it.decode_steps_s) for it in iters)
    batch_tokens = args.batch_size * args.output_len
    result = {
        # vLLM's keys (`vllm bench latency --output-json`): seconds, percentiles keyed "10" ... "99"
        "avg_latency": avg, "latencies": [float(x) for x in latencies],
        "percentiles": {str(p): float(np.percentile(latencies, p)) for p in LATENCY_PERCENTILES},
        "benchmark": "latency", "model": str(engine.model_dir), "dtype": engine.dtype,
        "device": engine.device, "data_parallel_size": args.data_parallel_size, "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len, "num_iters": args.num_iters,
        "avg_latency_s": round(avg, 4),
        "latencies_s": [round(float(x), 4) for x in latencies],
        "prefill_s": round(float(np.mean([it.prefill_s for it in iters])), 4),
        "prefill_steps": iters[-1].prefill_steps,
        "decode_steps": len(iters[-1].decode_steps_s),
        # output_len 1 leaves no decode step: report 0 rather than NaN (JSON has no NaN).
        "mean_decode_step_ms": round(float(steps_ms.mean()), 3) if steps_ms.size else 0.0,
        **{f"p{p}_decode_step_ms": round(float(np.percentile(steps_ms, p)), 3) if steps_ms.size else 0.0
           for p in STEP_PERCENTILES},
        "decode_tokens_per_s": round(sum(it.decode_tokens for it in iters) / decode_s, 1) if decode_s else 0.0,
        "output_tokens_per_s": round(batch_tokens / avg, 1),
        "total_tokens_per_s": round(args.batch_size * (args.input_len + args.output_len) / avg, 1),
        "startup_s": round(startup, 2), "peak_memory_mib": peak_memory_mib(engine.device),
    }
    print_table("Latency", result)
    print(json.dumps(result))
    write_json(args.output_json, result)
    return result


def _run_batch(engine, prompts: list[list[int]], params) -> Iteration:
    # A cached prompt would make the next prefill nearly free; every iteration must compute it.
    if not engine.reset_prefix_cache():
        logger.warning("could not reset the prefix cache; prefill times may be too low")
    start = time.perf_counter()
    ids = [f"latency-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": p}, params)
    waiting_first = set(ids)
    prefill_s, prefill_steps, decode_steps, decode_tokens = 0.0, 0, [], 0
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outputs = engine.step()
        dt = time.perf_counter() - t
        if waiting_first:
            prefill_s += dt
            prefill_steps += 1
            waiting_first.difference_update(o.request_id for o in outputs if o.outputs and o.outputs[0].token_ids)
        else:
            decode_steps.append(dt)
            decode_tokens += sum(len(o.delta_token_ids[0]) for o in outputs if o.delta_token_ids)
    return Iteration(time.perf_counter() - start, prefill_s, prefill_steps, decode_steps, decode_tokens)
