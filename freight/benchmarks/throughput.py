"""`freight bench throughput`: offline throughput of the engine on a request set (like vLLM's)."""

from __future__ import annotations

import json
import time

from freight.benchmarks.datasets import build_dataset
from freight.benchmarks.report import peak_memory_mib, print_table, write_json


def run(args) -> dict:
    from freight.cli.engine_args import engine_config_from_args
    from freight.engine.llm_engine import LLMEngine
    from freight.sampling_params import SamplingParams

    t0 = time.perf_counter()
    engine = LLMEngine(engine_config_from_args(args), args.data_parallel_size)
    startup = time.perf_counter() - t0
    reqs = build_dataset(args, engine.model_config.vocab_size)
    if args.warmup:
        _run_once(engine, reqs[:2], SamplingParams)
        engine.reset_prefix_cache()
    before = engine.get_stats()
    elapsed = _run_once(engine, reqs, SamplingParams)
    after = engine.get_stats()
    prompt_tokens = sum(len(r.prompt_ids) for r in reqs)
    output_tokens = sum(r.output_len for r in reqs)
    result = {
        "benchmark": "throughput", "model": str(engine.model_dir), "dtype": engine.dtype,
        "device": engine.device, "data_parallel_size": args.data_parallel_size, "dataset": args.dataset_name,
        "num_requests": len(reqs),
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(reqs) / elapsed, 3),
        "total_tokens_per_s": round((prompt_tokens + output_tokens) / elapsed, 1),
        "output_tokens_per_s": round(output_tokens / elapsed, 1),
        "startup_s": round(startup, 2), "peak_memory_mib": peak_memory_mib(engine.device),
        "prefix_caching": engine.config.enable_prefix_caching,
        "computed_prompt_tokens": after.num_computed_prompt_tokens - before.num_computed_prompt_tokens,
        "prefix_cache_hit_tokens": after.prefix_cache_hits - before.prefix_cache_hits,
        "preemptions": after.num_preemptions - before.num_preemptions,
        "steps": after.num_steps - before.num_steps,
    }
    print_table("Throughput", result)
    print(json.dumps(result))
    write_json(args.output_json, result)
    return result


def _run_once(engine, reqs, SamplingParams) -> float:
    start = time.perf_counter()
    for i, r in enumerate(reqs):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", {"prompt_token_ids": r.prompt_ids},
                           SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start
