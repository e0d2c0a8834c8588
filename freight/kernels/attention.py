"""ctypes binding of paged_attention.c: decode attention that reads the paged KV cache in place."""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from freight.kernels.build import c_function, kernel_cache

_I64, _F32, _INT, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_ARGTYPES = [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _INT, _INT, _INT, _INT, _I64, _INT, _F32, _I64]
_FUNCS = {torch.bfloat16: "paged_decode_bf16", torch.float32: "paged_decode_f32"}


@kernel_cache  # looked up for every layer of every step
def _decode_fn(dtype: torch.dtype):
    return c_function("paged_attention", _FUNCS[dtype], _ARGTYPES) if dtype in _FUNCS else None


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


_PREFILL_ARGTYPES = [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _INT, _PTR, _I64, _INT, _INT, _INT, _I64, _INT, _F32,
                     _I64]


_PREFILL_FUNCS = {torch.bfloat16: "paged_prefill_bf16", torch.float32: "paged_prefill_f32"}


@kernel_cache
def _prefill_fn(dtype: torch.dtype):
    if dtype not in _PREFILL_FUNCS:
        return None
    fn = c_function("prefill_attention", _PREFILL_FUNCS[dtype], _PREFILL_ARGTYPES)
    if fn is None:
        return None
    # The library builds everywhere; a function with no code for this ISA level reports -3
    # (bf16: AVX512_BF16; float32: AVX2).
    z = torch.zeros(1, 32, dtype=dtype)
    cache = torch.zeros(1, 1, 16, 32, dtype=dtype)
    table, chunks = torch.zeros(1, 1, dtype=torch.int64), torch.tensor([0, 1, 0], dtype=torch.int64)
    rc = fn(z.data_ptr(), 32, cache.data_ptr(), cache.data_ptr(), table.data_ptr(), 1, chunks.data_ptr(), 1,
            z.data_ptr(), 32, 1, 1, 32, 1, 16, 1.0, 0)
    return fn if rc == 0 else None


def paged_prefill_available(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    # AVX-512 kernel: head_dim % 32, runs of 16 keys; AVX2 kernel: head_dim % 8, runs of 8 (both hold)
    dim, block_size = q.shape[-1], k_cache.shape[2]
    return (q.device.type == "cpu" and dim % 32 == 0 and dim <= 256 and block_size % 16 == 0
            and _prefill_fn(q.dtype) is not None)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, chunks: torch.Tensor, out: torch.Tensor, scale: float,
                            window: Optional[int]) -> None:
    """Causal attention of prefill chunks over the paged cache, written into out's rows.

    q: [T, H, D] (rows may be strided); out: [T, H, D] contiguous; block_tables: [C, max_blocks];
    chunks: [C, 3] int64 rows of (first row in q, rows, tokens already cached before the chunk).
    """
    num_heads, dim = q.shape[1], q.shape[2]
    heads, num_blocks, block_size, _ = k_cache.shape
    if q.stride(2) != 1 or q.stride(1) != dim:
        q = q.contiguous()
    rc = _prefill_fn(q.dtype)(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                              block_tables.data_ptr(), block_tables.stride(0), chunks.data_ptr(), chunks.shape[0],
                              out.data_ptr(), out.stride(0), num_heads, heads, dim, num_blocks, block_size, scale,
                              window or 0)
    if rc != 0:
        raise RuntimeError(f"paged_prefill kernel failed ({rc}): heads {num_heads}/{heads}, dim {dim}")
