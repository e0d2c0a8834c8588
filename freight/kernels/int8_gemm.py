"""ctypes binding of int8_gemm.c: x @ (scale * W_int8)^T, any row count.

Runs with AVX-512 or AVX2+FMA (the int8 weights widened to float32 in registers) for float32
and bf16 activations; the generic build has no code and callers use their PyTorch path.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
import torch.nn.functional as F

from freight.kernels.build import c_function, kernel_cache

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
TILE = 16  # output columns per packed tile


@kernel_cache
def _fn():
    fn = c_function("int8_gemm", "int8_gemm", [_PTR, _I64, _INT, _PTR, _PTR, _PTR, _I64, _INT, _INT, _INT])
    if fn is None:
        return None
    # The library builds at every ISA level; with no code for this one it reports -2.
    x = torch.zeros(1, 2)
    w = pack_int8_weight(torch.zeros(TILE, 2, dtype=torch.int8))
    scales, y = torch.ones(TILE), torch.empty(1, TILE)
    return fn if fn(x.data_ptr(), 2, 0, w.data_ptr(), scales.data_ptr(), y.data_ptr(), TILE, 1, TILE, 2) == 0 else None


def int8_gemm_available() -> bool:
    return _fn() is not None


def pack_int8_weight(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> [ceil(N/16), K, 16]: for each k, the 16 columns of a tile in one 16-byte load
    (a partial last tile is zero-padded; the kernel stores only the columns that exist)."""
    n, k = q.shape
    q = F.pad(q, (0, 0, 0, -n % TILE))
    return q.view(-1, TILE, k).permute(0, 2, 1).contiguous()


def int8_gemm(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """x [rows, K] (float32 or bf16, rows may be strided) -> [rows, N] in x's dtype; scales float32 [N].
    None when x does not fit the kernel or it is not built here (then the caller's other path runs)."""
    fn = _fn()
    if (fn is None or x.dim() != 2 or x.device.type != "cpu" or x.stride(1) != 1
            or x.dtype not in (torch.float32, torch.bfloat16) or x.shape[1] != w_packed.shape[1]):
        return None
    y = torch.empty((x.shape[0], n), dtype=x.dtype)
    rc = fn(x.data_ptr(), x.stride(0), int(x.dtype == torch.bfloat16), w_packed.data_ptr(), scales.data_ptr(),
            y.data_ptr(), n, x.shape[0], n, x.shape[1])
    return y if rc == 0 else None
