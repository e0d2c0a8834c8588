"""Benchmark request sets: random lengths, and the project's standard workloads W1/W2.

W1/W2 are generated exactly as ../shared/bench/workloads.py does (Python's random
seeded with "w1-SEED" / "w2-SEED"), so every engine measured gets the same requests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Optional

FIRST_ID = 3  # keep clear of the usual special tokens at ids 0-2


@dataclass
class BenchRequest:
    prompt_ids: list[int]
    output_len: int
    prompt: Optional[str] = None  # text form, for HTTP servers


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_ID, vocab) for _ in range(n)]


def w1(seed: int = 0, vocab: int = 49152, num_requests: int = 32) -> list[BenchRequest]:
    """Independent prompts of 32-512 tokens, outputs of 16-256 tokens."""
    rng = random.Random(f"w1-{seed}")
    out = []
    for _ in range(num_requests):
        p, o = rng.randint(32, 512), rng.randint(16, 256)
        out.append(BenchRequest(_ids(rng, p, vocab), o))
    return out


def w2(seed: int = 0, vocab: int = 49152, num_requests: int = 32) -> list[BenchRequest]:
    """One shared 384-token prefix + 32 unique tokens each, 64 output tokens."""
    rng = random.Random(f"w2-{seed}")
    prefix = _ids(rng, 384, vocab)
    return [BenchRequest(prefix + _ids(rng, 32, vocab), 64) for _ in range(num_requests)]


def random_requests(num_requests: int, input_len: int, output_len: int, range_ratio: float, vocab: int,
                    seed: int = 0, prefix_len: int = 0) -> list[BenchRequest]:
    """Lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)], like vLLM's random dataset."""
    rng = random.Random(f"random-{seed}")
    prefix = _ids(rng, prefix_len, vocab)

    def length(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - range_ratio)), int(n * (1 + range_ratio))))

    return [BenchRequest(prefix + _ids(rng, length(input_len), vocab), length(output_len))
            for _ in range(num_requests)]


def load_jsonl(path: str) -> list[BenchRequest]:
    """Lines with prompt_ids (or prompt) and output_len, as ../shared/bench/workloads.py --dump writes."""
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out.append(BenchRequest(r.get("prompt_ids") or [], int(r["output_len"]), r.get("prompt")))
    return out


def add_dataset_args(p) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset-name", default="random", choices=["random", "w1", "w2", "jsonl"])
    g.add_argument("--dataset-path", default=None, help="JSON lines for --dataset-name jsonl")
    g.add_argument("--num-prompts", type=int, default=None, help="requests (default: 32 for w1/w2, 64 random)")
    g.add_argument("--random-input-len", "--input-len", dest="input_len", type=int, default=256)
    g.add_argument("--random-output-len", "--output-len", dest="output_len", type=int, default=128)
    g.add_argument("--random-range-ratio", dest="range_ratio", type=float, default=0.0)
    g.add_argument("--random-prefix-len", dest="prefix_len", type=int, default=0)
    g.add_argument("--dataset-seed", type=int, default=0)


def build_dataset(args, vocab: int) -> list[BenchRequest]:
    name, seed = args.dataset_name, args.dataset_seed
    if name == "w1":
        return w1(seed, vocab, args.num_prompts or 32)
    if name == "w2":
        return w2(seed, vocab, args.num_prompts or 32)
    if name == "jsonl":
        if not args.dataset_path:
            raise ValueError("--dataset-name jsonl needs --dataset-path")
        reqs = load_jsonl(args.dataset_path)
        return reqs[:args.num_prompts] if args.num_prompts else reqs
    return random_requests(args.num_prompts or 64, args.input_len, args.output_len, args.range_ratio, vocab, seed,
                           args.prefix_len)
