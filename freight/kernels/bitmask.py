"""ctypes binding of bitmask.c: a grammar bitmask applied to logits rows in place."""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from freight.kernels.build import c_function, kernel_cache

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


@kernel_cache
def _fn(dtype: torch.dtype):
    return c_function("bitmask", f"apply_bitmask_{_SUFFIX[dtype]}", [_PTR, _I64, _PTR, _PTR, _I64, _I64, _I64], None)


def apply_bitmask(logits: torch.Tensor, bitmask: np.ndarray, rows: list[int]) -> bool:
    """Mask logits[rows[i]] with bitmask row i in place; False when the kernel cannot run here."""
    if logits.device.type != "cpu" or logits.dtype not in _SUFFIX or logits.stride(1) != 1:
        return False
    fn = _fn(logits.dtype)
    if fn is None:
        return False
    mask = np.ascontiguousarray(bitmask, dtype=np.int32)
    index = np.asarray(rows, dtype=np.int64)
    fn(logits.data_ptr(), logits.stride(0), mask.ctypes.data, index.ctypes.data, len(rows), mask.shape[1],
       logits.shape[1])
    return True
