"""ctypes binding of greedy.c: argmax and the sampled token's log-probability per logits row."""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from freight.kernels.build import c_function, kernel_cache

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


@kernel_cache
def _fn(dtype: torch.dtype):
    return c_function("greedy", f"greedy_{_SUFFIX[dtype]}", [_PTR, _I64, _I64, _I64, _PTR, _PTR])


def greedy(logits: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(first argmax [B] int64, its log_softmax value [B] float32) of logits [B, V]; None when the kernel
    cannot run here (the caller's PyTorch path runs)."""
    if (logits.device.type != "cpu" or logits.dtype not in _SUFFIX or logits.dim() != 2
            or logits.stride(1) != 1 or logits.shape[1] == 0):
        return None
    fn = _fn(logits.dtype)
    if fn is None:
        return None
    rows = logits.shape[0]
    ids = torch.empty(rows, dtype=torch.int64)
    logprobs = torch.empty(rows, dtype=torch.float32)
    fn(logits.data_ptr(), logits.stride(0), rows, logits.shape[1], ids.data_ptr(), logprobs.data_ptr())
    return ids, logprobs
