"""Engine flags shared by every subcommand, spelled as vLLM spells them."""

from __future__ import annotations

import argparse
import json

from freight.config import EngineConfig
from freight.layers.quantization import QUANTIZATION_METHODS


def add_engine_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> None:
    g = parser.add_argument_group("engine")
    if model_positional:
        g.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="Hugging Face model directory or hub id (default: the bundled model)")
    g.add_argument("--model", default=None, help="Hugging Face model directory or hub id")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: the model's)")
    g.add_argument("--revision", default=None)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "half", "float"])
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, ...")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", dest="kv_cache_memory", default=None,
                   help="KV cache size, bytes or e.g. 2GiB (default: up to 4GiB on CPU)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per step (default 2048)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--num-threads", type=int, default=None, help="CPU threads for compute (default: all cores)")
    g.add_argument("--structured-outputs-config", type=json.loads, default=None, metavar="JSON",
                   help='grammar backend for structured outputs, e.g. \'{"backend": "xgrammar"}\' '
                        "(auto, xgrammar or guidance; default auto: xgrammar, llguidance for what it rejects)")
    g.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1, metavar="N",
                   help="split the model over N ranks (torch.distributed: gloo or shared memory on CPU, NCCL on "
                        "CUDA); rank 0 runs in the engine core's process, the CPUs are split between the ranks")
    g.add_argument("--distributed-executor-backend", choices=["mp", "ray"], default=None,
                   help="where tensor-parallel ranks run: mp (processes on this host, the default) or ray "
                        "(actors on the Ray cluster of RAY_ADDRESS or a local one; pip install 'freight[ray]')")
    g.add_argument("--model-impl", choices=["auto", "freight", "transformers"], default="auto",
                   help="freight's own model classes, the Transformers backend (any causal LM transformers "
                        "implements, on freight's paged KV cache), or auto: freight's class when there is one")
    g.add_argument("--quantization", "-q", choices=QUANTIZATION_METHODS, default=None,
                   help="quantize a float checkpoint's attention/MLP weights as it loads: int8 (weight-only, "
                        "per-output-channel scales; less weight memory, faster CPU decode at small batches: "
                        "docs/performance.md)")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s shape: \'{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\' drafts from the request\'s own context, '
                        "verified in one forward (output unchanged); off while more than disable_by_batch_size "
                        "requests are in the engine")
    g.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                   help="fcfs: requests in arrival order; priority: by each request's 'priority' (lower first, "
                        "then arrival), and the running request with the largest is preempted first")
    g.add_argument("--data-parallel-size", "-dp", type=positive_int, default=1, metavar="N",
                   help="engine-core processes, each with the whole model and its own KV cache (the CPUs are "
                        "split between them); requests go to the least loaded")
    g.add_argument("--generation-config", default="auto", metavar="{auto,vllm,DIR}",
                   help="where requests' default sampling parameters (temperature, top_p, top_k, min_p, "
                        "repetition_penalty, max_tokens) come from: auto (the model's generation_config.json), "
                        "vllm (none: the neutral defaults) or a directory holding a generation_config.json; "
                        "a request's own values always win")
    g.add_argument("--override-generation-config", type=json_object, default=None, metavar="JSON",
                   help='values laid over the generation config, e.g. \'{"temperature": 0.5}\' (also over '
                        "--generation-config vllm)")


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def json_object(value: str) -> dict:
    try:
        obj = json.loads(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {value!r}")
    return obj


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    model = getattr(args, "model_tag", None) or args.model
    if model is None:
        from freight.entrypoints.llm import _default_model
        model = _default_model()
    return EngineConfig(
        model=model, tokenizer=args.tokenizer, revision=args.revision, dtype=args.dtype, device=args.device,
        seed=args.seed, block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill, trust_remote_code=args.trust_remote_code,
        served_model_name=getattr(args, "served_model_name", None), num_threads=args.num_threads,
        structured_outputs_config=args.structured_outputs_config,
        tensor_parallel_size=args.tensor_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        model_impl=getattr(args, "model_impl", "auto"), generation_config=args.generation_config,
        override_generation_config=args.override_generation_config,
        clamp_max_tokens=getattr(args, "clamp_max_tokens", False),
        scheduling_policy=getattr(args, "scheduling_policy", "fcfs"),
        quantization=getattr(args, "quantization", None),
        speculative_config=getattr(args, "speculative_config", None))
