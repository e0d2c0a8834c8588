"""ctypes binding of decode_layers.c: every decoder layer of a decode-only step in one native call.

Used by Llama-shaped models (models/llama.py) when every piece the Python path would run is a native
kernel here: plain RMSNorm, bias-free fused QKV / O / gate-up / down projections packed for gemm.c
(and the step's rows within its row limit), rotary, paged decode attention without a sliding window
or softcap, one rank. Anything else (a prefill in the step, int8 weights, biases, CUDA, no compiler)
takes the Python path, which computes the same values op by op.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from freight.kernels import attention, elementwise, gemm
from freight.kernels.build import c_function, kernel_cache
from freight.layers.attention import AttentionMetadata

_I64, _F32, _INT, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_ARGTYPES = [_PTR, _PTR, _INT, _PTR, _PTR, _INT, _PTR, _I64, _F32, _F32, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR,
             _PTR]


@kernel_cache
def _driver():
    return c_function("decode_layers", "decode_layers", _ARGTYPES)


@kernel_cache
def _kernels(dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The five kernels' addresses for dtype (the driver's fns[]), or None if one is missing here."""
    fns = [elementwise._fn("rms_norm", dtype), elementwise._fn("rotary", dtype),
           elementwise._fn("silu_and_mul", dtype), gemm._fn(dtype), attention._decode_fn(dtype)]
    if any(f is None for f in fns):
        return None
    fns[3] = fns[3][0]  # (gemm's entry is (function, max rows))
    return torch.tensor([ctypes.cast(f, ctypes.c_void_p).value for f in fns], dtype=torch.int64)


def _linear_ok(m) -> bool:
    return getattr(m, "_small", None) is not None and m.bias is None and getattr(m, "_int8", None) is None


class FusedDecodeLayers:
    """The layers of one model, ready for decode_layers; build() says whether the model qualifies."""

    def __init__(self, model, layers, dtype: torch.dtype):
        self.model, self.layers, self.dtype = model, layers, dtype
        a, mlp = layers[0].self_attn, layers[0].mlp
        self.scale, self.eps = a.attn.scale, layers[0].input_layernorm.eps
        self.max_rows = gemm.small_gemm_max_rows(dtype)
        self.sizes = (model.cfg.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, mlp.intermediate)
        self._table: Optional[torch.Tensor] = None  # per layer: weight and cache pointers
        self._cache_key: Optional[tuple[int, ...]] = None

    @classmethod
    def build(cls, model) -> Optional["FusedDecodeLayers"]:
        from freight.distributed.parallel_state import get_tp_group
        from freight.layers.norm import RMSNorm

        layers = list(model.layers)
        dtype = model.embed_tokens.weight.dtype
        if (not layers or model.embed_tokens.weight.device.type != "cpu" or get_tp_group().world_size != 1
                or _driver() is None or _kernels(dtype) is None):
            return None
        for layer in layers:
            a, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            linears = (a.qkv_proj, a.o_proj, getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None))
            if (any(type(n) is not RMSNorm or n.weight.dtype != dtype or n.eps != norms[0].eps for n in norms)
                    or not all(_linear_ok(m) for m in linears) or getattr(a, "q_norm", None) is not None
                    or a.attn.sliding_window is not None or a.attn.logit_softcap is not None
                    or not hasattr(mlp, "intermediate")):
                return None
        return cls(model, layers, dtype)

    def _layer_table(self, kv_caches) -> torch.Tensor:
        key = tuple(t.data_ptr() for pair in kv_caches for t in pair)
        if key != self._cache_key:
            ptrs = []
            for layer, (k, v) in zip(self.layers, kv_caches):
                a, mlp = layer.self_attn, layer.mlp
                ptrs += [layer.input_layernorm.weight.data_ptr(), a.qkv_proj._small.data_ptr(),
                         a.o_proj._small.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                         mlp.gate_up_proj._small.data_ptr(), mlp.down_proj._small.data_ptr(), k.data_ptr(),
                         v.data_ptr()]
            self._table, self._cache_key = torch.tensor(ptrs, dtype=torch.int64), key
        return self._table

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, kv_caches, meta: AttentionMetadata,
                 cos: torch.Tensor, sin: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(last layer's output, residual) of a decode-only step; None when this step does not qualify or a
        kernel refused (then x may have been overwritten: the caller starts over from the embeddings)."""
        rows = x.shape[0]
        if (meta.prefills or meta.num_decodes != rows or rows > self.max_rows or x.dtype != self.dtype
                or not x.is_contiguous() or positions.dtype != torch.int64):
            return None
        hidden, heads, kv_heads, dim, inter = self.sizes
        k_cache = kv_caches[0][0]
        _, num_blocks, block_size, _ = k_cache.shape
        dims = torch.tensor([hidden, heads, kv_heads, dim, inter, block_size, x.element_size()], dtype=torch.int64)
        qkv = (heads + 2 * kv_heads) * dim
        work = torch.empty(rows * (hidden + qkv + heads * dim + 3 * inter), dtype=x.dtype)
        residual = torch.empty_like(x)
        tables, lens = meta.decode_block_tables, meta.decode_seq_lens
        if tables.dtype != torch.int64 or lens.dtype != torch.int64 or meta.slot_mapping.dtype != torch.int64:
            return None
        tables, lens = tables.contiguous(), lens.contiguous()
        rc = _driver()(_kernels(self.dtype).data_ptr(), self._layer_table(kv_caches).data_ptr(), len(self.layers),
                       x.data_ptr(), residual.data_ptr(), rows, dims.data_ptr(), num_blocks, self.eps, self.scale,
                       positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), meta.slot_mapping.data_ptr(),
                       tables.data_ptr(), tables.stride(0), lens.data_ptr(), work.data_ptr())
        return (x, residual) if rc == 0 else None
