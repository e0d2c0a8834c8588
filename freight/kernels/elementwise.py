"""ctypes bindings of elementwise.c: fused RMSNorm (+ residual add), rotary, SiLU-and-mul."""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from freight.kernels.build import c_function, kernel_cache

_I64, _F32, _INT, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
_SIGNATURES = {
    "rms_norm": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _F32],
    "rotary": [_PTR, _I64, _I64, _INT, _INT, _PTR, _PTR, _PTR],
    "silu_and_mul": [_PTR, _PTR, _I64, _I64],
}


@kernel_cache
def _fn(name: str, dtype: torch.dtype):
    if dtype not in _SUFFIX:
        return None
    return c_function("elementwise", f"{name}_{_SUFFIX[dtype]}", _SIGNATURES[name], None)


def _usable(x: torch.Tensor, name: str):
    return _fn(name, x.dtype) if x.device.type == "cpu" else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """weight * norm(x [+ residual]); adds x into residual in place. None: not runnable here."""
    fn = _usable(x, "rms_norm")
    if (fn is None or not x.is_contiguous() or weight.dtype != x.dtype
            or (residual is not None and (not residual.is_contiguous() or residual.dtype != x.dtype))):
        return None
    dim = x.shape[-1]
    out = torch.empty_like(x)
    fn(x.data_ptr(), residual.data_ptr() if residual is not None else None, weight.data_ptr(), out.data_ptr(),
       x.numel() // dim, dim, eps)
    return out


def rotary_inplace(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate x [T, heads, D] (rows may be strided) in place; cos/sin: float32 [max_pos, D]."""
    fn = _usable(x, "rotary")
    if fn is None or x.stride(2) != 1 or x.stride(1) != x.shape[2] or positions.dtype != torch.int64:
        return False
    fn(x.data_ptr(), x.shape[0], x.stride(0), x.shape[1], x.shape[2], positions.data_ptr(),
       cos.data_ptr(), sin.data_ptr())
    return True


def silu_and_mul(gate_up: torch.Tensor) -> Optional[torch.Tensor]:
    """silu(gate) * up for rows [gate | up]."""
    fn = _usable(gate_up, "silu_and_mul")
    if fn is None or not gate_up.is_contiguous():
        return None
    dim = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], dim))
    fn(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * dim), dim)
    return out
