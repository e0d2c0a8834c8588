"""`freight bench spec-decode`: n-gram speculative decoding against none, side by side in one process.

Two engines on the same model, one with --speculative-config (or its default ngram settings) and one
without, run the same greedy batches in alternating order, round after round (these machines are noisy:
only ratios taken in one run mean much). Per batch size it reports output tokens/s of each, their
ratio, the draft acceptance, and whether the outputs are token-identical (they must be).

Workloads (--workload):
- grounded: input-grounded requests. Each prompt is a stretch of real Python source (the standard
  library's own files, chosen by --seed) followed by its first lines again, so a model that follows
  its context goes on repeating it: the case n-gram drafting is for (edits, quoting, extraction).
- random: random token prompts: drafts rarely match, so this measures what speculation costs when
  it does not pay.
Speculation is forced on at every batch size here (disable_by_batch_size is raised), to show where
it stops paying: that crossover is what DEFAULT_DISABLE_BY_BATCH_SIZE is set from.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sysconfig
import time
from pathlib import Path

from freight.benchmarks.datasets import random_requests
from freight.benchmarks.report import print_table, write_json

DEFAULT_SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def add_arguments(parser) -> None:
    parser.add_argument("--workload", choices=["grounded", "random"], default="grounded")
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="comma-separated")
    parser.add_argument("--input-len", type=int, default=256, help="prompt tokens (about, for grounded)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output-json", default=None)


def grounded_prompts(tokenizer, count: int, input_len: int, seed: int, max_len: int) -> list[list[int]]:
    """Stretches of standard-library source, each followed by its own first lines again (at most max_len
    tokens: the stretch is cut short to fit)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng = random.Random(f"spec-grounded-{seed}")
    prompts = []
    while len(prompts) < count:
        lines = files[rng.randrange(len(files))].read_text(errors="replace").splitlines(keepends=True)
        if len(lines) < 80:
            continue
        start = rng.randrange(len(lines) - 60)
        body, n = [], 0
        for line in lines[start:]:
            n += len(tokenizer.encode(line, add_special_tokens=False))
            body.append(line)
            if n >= input_len:
                break
        head = tokenizer.encode("\n" + "".join(body[:3]), add_special_tokens=False)
        body_ids = tokenizer.encode("".join(body), add_special_tokens=False)[:max_len - len(head)]
        prompts.append(body_ids + head)
    return prompts


def run(args) -> dict:
    from freight.cli.engine_args import engine_config_from_args
    from freight.engine.llm_engine import LLMEngine
    from freight.sampling_params import SamplingParams
    from freight.spec_decode.config import SpeculativeConfig

    config = engine_config_from_args(args)
    spec = config.speculative_config or SpeculativeConfig.parse(DEFAULT_SPEC)
    spec = dataclasses.replace(spec, disable_by_batch_size=1 << 30)
    # (built first, the engine without speculation: on the 2-core dev box the first engine of a process ran
    # 3-5% faster, so the ratio errs against speculation)
    base = LLMEngine(dataclasses.replace(config, speculative_config=None))
    specd = LLMEngine(dataclasses.replace(config, speculative_config=spec))
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    count = max(sizes)
    if args.workload == "grounded":
        room = base.max_model_len - args.output_len
        prompts = grounded_prompts(base.tokenizer, count, args.input_len, args.seed, min(args.input_len, room))
    else:
        prompts = [r.prompt_ids for r in random_requests(count, args.input_len, 1, 0.0,
                                                         base.model_config.vocab_size, args.seed)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for engine in (base, specd):  # warm-up: kernels built, pages touched
        _generate(engine, prompts[:1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    rows = []
    for bs in sizes:
        batch = prompts[:bs]
        times = {"base": [], "spec": []}
        identical = True
        before = specd.get_stats().spec_decoding
        for r in range(args.rounds):
            order = [("base", base), ("spec", specd)] if r % 2 == 0 else [("spec", specd), ("base", base)]
            outs = {}
            for name, engine in order:
                engine.reset_prefix_cache()
                t0 = time.perf_counter()
                outs[name] = _generate(engine, batch, params)
                times[name].append(time.perf_counter() - t0)
            identical &= outs["base"] == outs["spec"]
        after = specd.get_stats().spec_decoding
        drafted = after.num_draft_tokens - before.num_draft_tokens
        accepted = after.num_accepted_tokens - before.num_accepted_tokens
        tokens = bs * args.output_len
        base_s, spec_s = min(times["base"]), min(times["spec"])
        rows.append({
            "batch_size": bs, "base_output_tokens_per_s": round(tokens / base_s, 1),
            "spec_output_tokens_per_s": round(tokens / spec_s, 1), "speedup": round(base_s / spec_s, 3),
            "drafts": after.num_drafts - before.num_drafts, "draft_tokens": drafted, "accepted_tokens": accepted,
            "acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0,
            "mean_accepted_per_draft": round(accepted / (after.num_drafts - before.num_drafts), 3)
            if after.num_drafts > before.num_drafts else 0.0,
            "identical_outputs": identical,
            "base_s": [round(t, 3) for t in times["base"]], "spec_s": [round(t, 3) for t in times["spec"]],
        })
        print(json.dumps({"benchmark": "spec-decode", **rows[-1]}))
    result = {"benchmark": "spec-decode", "model": str(base.model_dir), "dtype": base.dtype, "device": base.device,
              "workload": args.workload, "input_len": args.input_len, "output_len": args.output_len,
              "speculative_config": spec.to_dict(), "rounds": args.rounds, "results": rows}
    print_table("Speculative decoding", {k: v for k, v in result.items() if k != "results"})
    print(json.dumps(result))
    write_json(args.output_json, result)
    for engine in (base, specd):
        engine.shutdown()
    return result


def _generate(engine, prompts: list[list[int]], params) -> list[list[int]]:
    ids = [f"spec-bench-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": p}, params)
    tokens = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
    return [tokens[rid] for rid in ids]
