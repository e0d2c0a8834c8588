"""`freight bench throughput | latency | serve | spec-decode | soak` (flags follow `vllm bench`)."""

from __future__ import annotations

import argparse

from freight.benchmarks.datasets import add_dataset_args
from freight.cli.engine_args import add_engine_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark offline throughput, batch latency or a live server")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)

    t = sub.add_parser("throughput", help="offline throughput on a request set")
    add_dataset_args(t)
    t.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--structured-output", choices=["none", "json"], default="none",
                   help="json: constrain every request to a JSON schema (a list of records that cannot end "
                        "within the output length, so the token counts match an unconstrained run)")
    t.add_argument("--output-json", default=None)
    add_engine_args(t)
    t.set_defaults(func=_run("throughput"))

    lat = sub.add_parser("latency", help="prefill and per-step decode time of one batch")
    lat.add_argument("--batch-size", type=int, default=8)
    lat.add_argument("--input-len", type=int, default=32)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--num-iters", type=int, default=3)
    lat.add_argument("--num-iters-warmup", type=int, default=1)
    lat.add_argument("--output-json", default=None)
    add_engine_args(lat)
    lat.set_defaults(func=_run("latency"))

    s = sub.add_parser("serve", help="load-test an OpenAI-compatible server (freight, vLLM, llama.cpp, ...)")
    s.add_argument("--base-url", default="http://127.0.0.1:8000")
    s.add_argument("--endpoint", default="/v1/completions")
    s.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    s.add_argument("--tokenizer", default=None,
                   help="tokenizer dir for text prompts and the vocabulary of random ones (default: --model if it "
                        "is a local dir, else the model path the server reports)")
    s.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson arrivals")
    s.add_argument("--burstiness", type=float, default=1.0)
    s.add_argument("--max-concurrency", type=int, default=None)
    s.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    s.add_argument("--prompt-format", choices=["ids", "text"], default="ids",
                   help="/v1/completions prompts as token ids (exact lengths) or decoded text; chat always sends text")
    s.add_argument("--api-key", default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--timeout", type=float, default=600.0)
    s.add_argument("--metric-percentiles", "--percentiles", dest="percentiles", default="50,90,99",
                   help="comma-separated, e.g. 50,90,99,99.9")
    s.add_argument("--disable-tqdm", action="store_true")
    s.add_argument("--output-json", default=None, help="write the summary and the per-request lists here")
    s.add_argument("--save-result", action="store_true",
                   help="as vLLM: write the result to {backend}-{rate}qps[-concurrency{N}]-{model}-{date}.json")
    s.add_argument("--save-detailed", action="store_true",
                   help="with --save-result: include the per-request lists (input_lens, ttfts, itls, ...)")
    s.add_argument("--result-dir", default=None, help="folder for --save-result (default: the current one)")
    s.add_argument("--result-filename", default=None, help="file name for --save-result instead of vLLM's")
    add_dataset_args(s)
    s.set_defaults(func=_run("serve"))

    sp = sub.add_parser("spec-decode", help="n-gram speculative decoding vs none, alternating in one process: "
                                            "tokens/s, acceptance, identical outputs")
    from freight.benchmarks.spec_decode import add_arguments as add_spec_args
    add_spec_args(sp)
    add_engine_args(sp)
    sp.set_defaults(func=_run("spec_decode"))

    b = sub.add_parser("bitmask", help="applying a grammar's token bitmask to logits: freight vs xgrammar")
    b.add_argument("--rows", type=int, default=32)
    b.add_argument("--vocab-size", type=int, default=151936)
    b.add_argument("--iters", type=int, default=30)
    b.add_argument("--output-json", default=None)
    b.set_defaults(func=_run("bitmask"))

    a = sub.add_parser("allreduce", help="tensor-parallel all-reduce on one host: gloo vs shared memory")
    from freight.benchmarks.allreduce import add_arguments as add_allreduce_args
    add_allreduce_args(a)
    a.set_defaults(func=_run("allreduce"))

    k = sub.add_parser("soak", help="robustness soak of a live server: a mix of requests, client hang-ups, "
                                    "checked responses, back to idle after")
    k.add_argument("--base-url", default="http://127.0.0.1:8000")
    k.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    k.add_argument("--num-requests", type=int, default=2000)
    k.add_argument("--concurrency", type=int, default=32)
    k.add_argument("--abort-fraction", type=float, default=0.2,
                   help="share of requests the client hangs up on mid-request")
    k.add_argument("--max-tokens", type=int, default=16, help="each request asks for 1..this many tokens")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--api-key", default=None)
    k.add_argument("--timeout", type=float, default=600.0, help="bound on the whole run, in seconds")
    k.add_argument("--idle-timeout", type=float, default=30.0,
                   help="how long the server may take to go idle after the run, in seconds")
    k.add_argument("--warmup-fraction", type=float, default=0.05,
                   help="share of the requests sent first; the starting RSS is read after them")
    k.add_argument("--output-json", default=None)
    k.set_defaults(func=_soak)


def _soak(args) -> int:
    from freight.benchmarks.soak import run

    return run(args)  # 1 when the soak failed


def _run(name: str):
    def run(args) -> int:
        import importlib

        importlib.import_module(f"freight.benchmarks.{name}").run(args)
        return 0
    return run
