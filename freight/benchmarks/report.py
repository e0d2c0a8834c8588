"""Shared output of the bench commands: a readable table and a JSON file."""

from __future__ import annotations

import json
import resource
from typing import Optional

import torch


def peak_memory_mib(device: str = "cpu") -> float:
    """Peak memory of this process (an in-process engine; engine-core processes are not counted)."""
    if str(device).startswith("cuda") and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def print_table(title: str, result: dict) -> None:
    width = max(len(k) for k in result)
    print(f"{'=' * 12} {title} {'=' * 12}")
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")


def write_json(path: Optional[str], result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
