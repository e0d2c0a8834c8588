"""`freight generate`: run prompts through the offline engine and print the completions."""

from __future__ import annotations

import argparse
import sys

from freight.cli.engine_args import add_engine_args, engine_config_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text offline from one or more prompts")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print text as it is generated (one prompt only)")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from freight.engine.llm_engine import LLMEngine
    from freight.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sample_seed, ignore_eos=args.ignore_eos)
    engine = LLMEngine(engine_config_from_args(args), args.data_parallel_size)
    stream = args.stream and len(args.prompt) == 1
    for i, prompt in enumerate(args.prompt):
        engine.add_request(str(i), prompt, params)
    finished = {}
    if stream:
        sys.stdout.write(args.prompt[0])
    while engine.has_unfinished_requests():
        for out in engine.step():
            if stream:
                sys.stdout.write(out.delta_text[0])
                sys.stdout.flush()
            if out.finished:
                finished[out.request_id] = out
    if stream:
        sys.stdout.write("\n")
        return 0
    for i, prompt in enumerate(args.prompt):
        out = finished[str(i)].outputs[0]
        print(f"=== prompt {i} ({out.finish_reason}, {len(out.token_ids)} tokens)")
        print(prompt + out.text)
    return 0
