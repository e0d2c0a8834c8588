"""`freight bench throughput`: offline throughput of the engine on a request set (like vLLM's).

`--structured-output json` constrains every request to BENCH_SCHEMA, a list of records
whose minItems cannot be reached within any request's output length, so a constrained
run generates exactly the tokens an unconstrained one does and the two times compare.
"""

from __future__ import annotations

import json
import statistics
import time

from freight.benchmarks.datasets import build_dataset
from freight.benchmarks.report import peak_memory_mib, print_table, write_json

BENCH_SCHEMA = {"type": "array", "minItems": 10000, "items": {
    "type": "object", "required": ["id", "name", "score", "tags"], "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "pattern": "^[A-Za-z .,'-]{1,24}$"},
        "score": {"type": "number"},
        "tags": {"type": "array", "maxItems": 4, "items": {"type": "string", "enum": ["a", "b", "new", "old"]}}}}}


def run(args) -> dict:
    from freight.cli.engine_args import engine_config_from_args
    from freight.engine.llm_engine import LLMEngine
    from freight.sampling_params import SamplingParams

    t0 = time.perf_counter()
    engine = LLMEngine(engine_config_from_args(args), args.data_parallel_size)
    startup = time.perf_counter() - t0
    reqs = build_dataset(args, engine.model_config.vocab_size)
    constraint = None
    if args.structured_output == "json":
        from freight.sampling_params import StructuredOutputsParams

        constraint = StructuredOutputsParams(json=BENCH_SCHEMA)
    # Map the KV pages the runs will write first (the warm-up's too: the pool hands out unused blocks in id
    # order), as vLLM's start-up does by zero-filling its cache: the timed run then measures the engine, not
    # first-touch page faults (3-5 ms per MB in a VM).
    t0 = time.perf_counter()
    touched = reqs + (reqs[:2] if args.warmup else [])
    mapped = engine.map_kv_cache([len(r.prompt_ids) + r.output_len for r in touched])
    kv_map_s = time.perf_counter() - t0
    if args.warmup:
        _run_once(engine, reqs[:2], SamplingParams, constraint)
        engine.reset_prefix_cache()
    before = engine.get_stats()
    elapsed = _run_once(engine, reqs, SamplingParams, constraint)
    after = engine.get_stats()
    prompt_tokens = sum(len(r.prompt_ids) for r in reqs)
    output_tokens = sum(r.output_len for r in reqs)
    result = {
        # vLLM's keys (`vllm bench throughput --output-json`), unrounded as there
        "elapsed_time": elapsed, "num_requests": len(reqs), "total_num_tokens": prompt_tokens + output_tokens,
        "requests_per_second": len(reqs) / elapsed, "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
        "benchmark": "throughput", "model": str(engine.model_dir), "dtype": engine.dtype,
        "device": engine.device, "data_parallel_size": args.data_parallel_size, "dataset": args.dataset_name,
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(reqs) / elapsed, 3),
        "total_tokens_per_s": round((prompt_tokens + output_tokens) / elapsed, 1),
        "output_tokens_per_s": round(output_tokens / elapsed, 1),
        "startup_s": round(startup, 2), "kv_cache_map_s": round(kv_map_s, 2) if mapped else None,
        "peak_memory_mib": peak_memory_mib(engine.device),
        "prefix_caching": engine.config.enable_prefix_caching,
        "computed_prompt_tokens": after.num_computed_prompt_tokens - before.num_computed_prompt_tokens,
        "prefix_cache_hit_tokens": after.prefix_cache_hits - before.prefix_cache_hits,
        "preemptions": after.num_preemptions - before.num_preemptions,
        "steps": after.num_steps - before.num_steps,
        "generated_tokens": after.num_generated_tokens - before.num_generated_tokens,
        "structured_output": args.structured_output,
    }
    compile_ms = _grammar_compile_ms(engine)
    if compile_ms:
        result["grammar_compiles"] = len(compile_ms)
        result["grammar_compile_ms_median"] = round(statistics.median(compile_ms), 2)
        result["grammar_compile_ms_max"] = round(max(compile_ms), 2)
    print_table("Throughput", result)
    print(json.dumps(result))
    write_json(args.output_json, result)
    return result


def _grammar_compile_ms(engine) -> list[float]:
    """Compile times of this process's engine core (none with data parallelism: the cores are elsewhere)."""
    try:
        manager = engine.engine_core._structured
    except (AttributeError, RuntimeError):
        return []
    return [t * 1e3 for t in manager.compile_times] if manager is not None else []


def _run_once(engine, reqs, SamplingParams, constraint=None) -> float:
    start = time.perf_counter()
    for i, r in enumerate(reqs):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", {"prompt_token_ids": r.prompt_ids},
                           SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True,
                                          structured_outputs=constraint))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start
