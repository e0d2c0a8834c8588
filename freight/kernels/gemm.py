"""ctypes binding of gemm.c: bf16 matmul for the few rows of a decode step."""

from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Optional

import torch

from freight.kernels.build import c_function

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
TILE = 16  # output columns per packed tile


@lru_cache(maxsize=None)
def _fn():
    fn = c_function("gemm", "gemm_bf16_packed", [_PTR, _I64, _PTR, _PTR, _I64, _INT, _INT, _INT])
    if fn is None:
        return None
    # The library builds everywhere; it reports -2 on a CPU without AVX512_BF16.
    probe = torch.zeros(1, 2, dtype=torch.bfloat16)
    w = pack_weight(torch.zeros(TILE, 2, dtype=torch.bfloat16))
    out = torch.empty(1, TILE, dtype=torch.bfloat16)
    return fn if fn(probe.data_ptr(), 2, w.data_ptr(), out.data_ptr(), TILE, 1, TILE, 2) == 0 else None


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/16, K/2, 16, 2]: each 64-byte run is one vdpbf16ps operand."""
    n, k = w.shape
    return w.view(n // TILE, TILE, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def small_gemm_supported(w: torch.Tensor) -> bool:
    n, k = w.shape
    return (w.device.type == "cpu" and w.dtype == torch.bfloat16 and n % TILE == 0 and k % 2 == 0
            and _fn() is not None)


def small_gemm(x: torch.Tensor, w_packed: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """x [rows, K] (rows may be strided) @ W^T -> [rows, N]; None when x does not fit the kernel."""
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype != torch.bfloat16:
        return None
    y = torch.empty((x.shape[0], n), dtype=torch.bfloat16)
    rc = _fn()(x.data_ptr(), x.stride(0), w_packed.data_ptr(), y.data_ptr(), n, x.shape[0], n, x.shape[1])
    return y if rc == 0 else None
