"""ctypes binding of decode_layers.c: every decoder layer of a small step in one native call.

Used by Llama-shaped models (models/llama.py) when every piece the Python path would run is a native
kernel here: plain RMSNorm; fused QKV (with or without Qwen2's biases), O, gate-up and down projections
packed for gemm.c (the step's rows within its row limit) or quantized for int8_gemm.c; rotary; paged
attention without a sliding window or softcap (decodes through the decode kernel; prefill chunks, such
as speculative verification, through the prefill kernel); one rank. Anything else (a step of more rows
than gemm.c takes, other biases, CUDA, no compiler) takes the Python path, which computes the same
values op by op.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from freight.kernels import attention, elementwise, gemm, int8_gemm
from freight.kernels.build import c_function, kernel_cache
from freight.layers.attention import AttentionMetadata
from freight.layers.linear import SMALL_GEMM_MAX_ROWS

_I64, _F32, _INT, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_ARGTYPES = [_PTR, _PTR, _INT, _PTR, _PTR, _INT, _PTR, _I64, _F32, _F32, _PTR, _PTR, _PTR, _PTR,
             _INT, _PTR, _I64, _PTR, _INT, _PTR, _I64, _PTR, _PTR]


@kernel_cache
def _driver():
    return c_function("decode_layers", "decode_layers", _ARGTYPES)


@kernel_cache
def _kernels(dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The kernels' addresses for dtype (the driver's fns[]: int8_gemm may be 0), or None if one is missing."""
    fns = [elementwise._fn("rms_norm", dtype), elementwise._fn("rotary", dtype),
           elementwise._fn("silu_and_mul", dtype), gemm._fn(dtype), attention._decode_fn(dtype)]
    if any(f is None for f in fns):
        return None
    fns[3] = fns[3][0]  # (gemm's entry is (function, max rows))
    addresses = [ctypes.cast(f, ctypes.c_void_p).value for f in fns]
    for optional in (int8_gemm._fn(), attention._prefill_fn(dtype)):
        addresses.append(ctypes.cast(optional, ctypes.c_void_p).value if optional is not None else 0)
    return torch.tensor(addresses, dtype=torch.int64)


def _weights(m, bias_ok: bool = False) -> Optional[tuple[str, torch.Tensor, Optional[torch.Tensor]]]:
    """How the driver multiplies by linear m: ("float", gemm.c's packed weight, None) or ("int8", packed int8
    weight, scales); None when it cannot (a weight the Python path multiplies another way, or a bias where
    the driver adds none: it adds the QKV projection's)."""
    if m is None or (m.bias is not None and not bias_ok):
        return None
    q = getattr(m, "_int8", None)
    if q is not None:
        return ("int8", q.packed, q.scales) if q.packed is not None and int8_gemm._fn() is not None else None
    small = getattr(m, "_small", None)
    return ("float", small, None) if small is not None else None


class FusedDecodeLayers:
    """The layers of one model, ready for decode_layers; build() says whether the model qualifies."""

    def __init__(self, model, layers, dtype: torch.dtype, int8: bool):
        self.layers, self.dtype, self.int8 = layers, dtype, int8
        a, mlp = layers[0].self_attn, layers[0].mlp
        self.scale, self.eps = a.attn.scale, layers[0].input_layernorm.eps
        # (int8_gemm.c takes any row count; linear.py sends gemm.c at most its limit)
        self.max_rows = SMALL_GEMM_MAX_ROWS if int8 else min(gemm.small_gemm_max_rows(dtype), SMALL_GEMM_MAX_ROWS)
        self.sizes = (model.cfg.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, mlp.intermediate)
        self.has_prefill = bool(_kernels(dtype)[6])  # the prefill attention kernel is built here
        self._table: Optional[torch.Tensor] = None  # per layer: weight and cache pointers
        self._cache_key: Optional[tuple[int, ...]] = None

    @classmethod
    def build(cls, model) -> Optional["FusedDecodeLayers"]:
        from freight.distributed.parallel_state import get_tp_group
        from freight.layers.norm import RMSNorm

        layers = list(model.layers)
        dtype = model.embed_tokens.weight.dtype
        kinds: set = set()  # every projection of every layer float, or every one int8
        if (not layers or model.embed_tokens.weight.device.type != "cpu" or get_tp_group().world_size != 1
                or _driver() is None or _kernels(dtype) is None):
            return None
        for layer in layers:
            a, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            linears = [_weights(a.qkv_proj, bias_ok=True)] + [
                _weights(m) for m in (a.o_proj, getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None))]
            if a.qkv_proj.bias is not None and a.qkv_proj.bias.dtype != dtype:
                return None
            kinds.update(w[0] if w is not None else None for w in linears)
            if (any(type(n) is not RMSNorm or n.weight.dtype != dtype or n.eps != norms[0].eps for n in norms)
                    or len(kinds) != 1 or None in kinds or getattr(a, "q_norm", None) is not None
                    or a.attn.sliding_window is not None or a.attn.logit_softcap is not None
                    or not hasattr(mlp, "intermediate")):
                return None
        return cls(model, layers, dtype, int8="int8" in kinds)

    def _layer_table(self, kv_caches) -> torch.Tensor:
        key = tuple(t.data_ptr() for pair in kv_caches for t in pair)
        if key != self._cache_key:
            ptrs = []
            for layer, (k, v) in zip(self.layers, kv_caches):
                a, mlp = layer.self_attn, layer.mlp
                w = [_weights(a.qkv_proj, bias_ok=True)] + [_weights(m) for m in (a.o_proj, mlp.gate_up_proj,
                                                                                      mlp.down_proj)]
                ptrs += [layer.input_layernorm.weight.data_ptr(), w[0][1].data_ptr(), w[1][1].data_ptr(),
                         layer.post_attention_layernorm.weight.data_ptr(), w[2][1].data_ptr(), w[3][1].data_ptr(),
                         k.data_ptr(), v.data_ptr()]
                ptrs += [s.data_ptr() if s is not None else 0 for _, _, s in w]
                ptrs.append(a.qkv_proj.bias.data_ptr() if a.qkv_proj.bias is not None else 0)
            self._table, self._cache_key = torch.tensor(ptrs, dtype=torch.int64), key
        return self._table

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, kv_caches, meta: AttentionMetadata,
                 cos: torch.Tensor, sin: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(last layer's output, residual) of a step of embeddings x; None when this step does not qualify
        or a kernel refused (x is left as it was: the caller's Python path runs it)."""
        rows = x.shape[0]
        hidden, heads, kv_heads, dim, inter = self.sizes
        k_cache = kv_caches[0][0]
        _, num_blocks, block_size, _ = k_cache.shape
        if rows > self.max_rows or x.dtype != self.dtype or positions.dtype != torch.int64:
            return None
        nd, chunks = meta.num_decodes, meta.prefill_rows
        if meta.prefills and (chunks is None or not self.has_prefill or dim % 32 or dim > 256
                              or block_size % 16):  # (what paged_prefill_available asks)
            return None
        dims = torch.tensor([hidden, heads, kv_heads, dim, inter, block_size, x.element_size(), int(self.int8)],
                            dtype=torch.int64)
        qkv = (heads + 2 * kv_heads) * dim
        work = torch.empty(rows * (hidden + qkv + heads * dim + 3 * inter), dtype=x.dtype)
        out, residual = torch.empty_like(x), x.contiguous().clone()
        tables, lens = _int64(meta.decode_block_tables), _int64(meta.decode_seq_lens)
        chunk_tables, chunks = _int64(meta.prefill_block_tables), _int64(chunks)
        rc = _driver()(_kernels(self.dtype).data_ptr(), self._layer_table(kv_caches).data_ptr(), len(self.layers),
                       out.data_ptr(), residual.data_ptr(), rows, dims.data_ptr(), num_blocks, self.eps, self.scale,
                       positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), _int64(meta.slot_mapping).data_ptr(),
                       nd, _ptr(tables), _stride(tables), _ptr(lens),
                       len(meta.prefills), _ptr(chunk_tables), _stride(chunk_tables), _ptr(chunks), work.data_ptr())
        return (out, residual) if rc == 0 else None


def _int64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.int64).contiguous()


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _stride(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.stride(0)
