"""ctypes binding of paged_attention.c: decode attention that reads the paged KV cache in place."""

from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Optional

import torch

from freight.kernels.build import load

_I64, _F32, _INT, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_ARGTYPES = [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _INT, _INT, _INT, _INT, _I64, _INT, _F32, _I64]
_FUNCS = {torch.bfloat16: "paged_decode_bf16", torch.float32: "paged_decode_f32"}


@lru_cache(maxsize=None)  # looked up for every layer of every step
def _decode_fn(dtype: torch.dtype):
    lib = load("paged_attention")
    if lib is None or dtype not in _FUNCS:
        return None
    fn = getattr(lib, _FUNCS[dtype])
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    return fn


def paged_decode_available(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and _decode_fn(q.dtype) is not None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           window: Optional[int]) -> torch.Tensor:
    """q: [b, H, D] (rows may be strided); caches: [Hkv, num_blocks, block_size, D]; returns [b, H, D]."""
    fn = _decode_fn(q.dtype)
    b, num_heads, dim = q.shape
    heads, num_blocks, block_size, _ = k_cache.shape
    if q.stride(2) != 1 or q.stride(1) != dim:
        q = q.contiguous()
    tables = block_tables if block_tables.dtype == torch.int64 else block_tables.long()
    tables, lens = tables.contiguous(), seq_lens.to(torch.int64).contiguous()
    out = torch.empty((b, num_heads, dim), dtype=q.dtype)
    rc = fn(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
            tables.stride(0), lens.data_ptr(), out.data_ptr(), b, num_heads, heads, dim, num_blocks,
            block_size, scale, window or 0)
    if rc != 0:
        raise RuntimeError(f"paged_decode kernel failed ({rc}): heads {num_heads}/{heads}, dim {dim}")
    return out
