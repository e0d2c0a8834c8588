"""ctypes binding of gemm.c: the matmul of the few rows of a decode step, on pre-packed weights.

bf16 runs with AVX512_BF16 (vdpbf16ps) or AVX2+FMA (bf16 widened to float32); float32 with
AVX2+FMA (also in the AVX-512 build). Each (dtype, ISA level) has the row range where the
kernel beat oneDNN's packed weights (docs/performance.md, "AVX2").
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from freight.kernels.build import c_function, kernel_cache
from freight.kernels.cpu_features import kernel_isa

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
TILE = 16  # output columns per packed tile
_SYMBOLS = {torch.bfloat16: "gemm_bf16_packed", torch.float32: "gemm_f32_packed"}
# ISA levels where the kernel is used, and up to how many rows (beyond: oneDNN). Measured on
# bench-135m's shapes, one thread, weights streamed; linear.py caps all dtypes at its own limit.
# float32 against oneDNN limited to AVX2: 1.9-2.4x at 1 row, 1.3-1.5x at 4, 1.0-1.2x at 8, 0.7-0.9x
# at 16; against oneDNN on AVX-512: 1.7-2x at 1 row, 0.8-1.0x at 4 (an AVX-512 float32 kernel
# could do better there; not written).
_MAX_ROWS = {
    (torch.bfloat16, "avx512bf16"): 512,
    (torch.bfloat16, "avx2"): 512,  # no oneDNN alternative: PyTorch emulates bf16 matmuls there
    (torch.float32, "avx2"): 8,
    (torch.float32, "avx512bf16"): 1,
}


@kernel_cache
def _fn(dtype: torch.dtype):
    isa = kernel_isa()
    if (dtype, isa) not in _MAX_ROWS:
        return None
    fn = c_function("gemm", _SYMBOLS[dtype], [_PTR, _I64, _PTR, _PTR, _I64, _INT, _INT, _INT])
    if fn is None:
        return None
    # The library builds everywhere; a function with no code for this ISA level reports -2.
    probe = torch.zeros(1, 2, dtype=dtype)
    w = pack_weight(torch.zeros(TILE, 2, dtype=dtype))
    out = torch.empty(1, TILE, dtype=dtype)
    if fn(probe.data_ptr(), 2, w.data_ptr(), out.data_ptr(), TILE, 1, TILE, 2) != 0:
        return None
    return fn, _MAX_ROWS[(dtype, isa)]


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """bf16 [N, K] -> [N/16, K/2, 16, 2] (each 64-byte run: one vdpbf16ps operand, or 8 columns'
    (k, k+1) pairs twice on AVX2); float32 [N, K] -> [N/16, K, 16]."""
    n, k = w.shape
    if w.dtype == torch.float32:
        return w.view(n // TILE, TILE, k).permute(0, 2, 1).contiguous()
    return w.view(n // TILE, TILE, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def small_gemm_max_rows(dtype: torch.dtype) -> int:
    """Up to how many rows small_gemm runs for dtype at this ISA level (0: never)."""
    entry = _fn(dtype) if dtype in _SYMBOLS else None
    return 0 if entry is None else entry[1]


def small_gemm_supported(w: torch.Tensor) -> bool:
    n, k = w.shape
    return w.device.type == "cpu" and n % TILE == 0 and k % 2 == 0 and small_gemm_max_rows(w.dtype) > 0


def small_gemm(x: torch.Tensor, w_packed: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """x [rows, K] (rows may be strided) @ W^T -> [rows, N]; None when x does not fit the kernel
    (then the caller's other path runs)."""
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype != w_packed.dtype:
        return None
    entry = _fn(x.dtype)
    if entry is None or x.shape[0] > entry[1]:
        return None
    fn = entry[0]
    y = torch.empty((x.shape[0], n), dtype=x.dtype)
    rc = fn(x.data_ptr(), x.stride(0), w_packed.data_ptr(), y.data_ptr(), n, x.shape[0], n, x.shape[1])
    return y if rc == 0 else None
