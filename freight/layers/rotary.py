"""Rotary position embeddings with the rope_scaling types of Llama-family configs.

cos/sin are precomputed for every position up to max_positions in float32 (the same
arithmetic transformers does on the fly), then gathered by position each step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from freight.kernels import rotary_inplace

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(head_dim: int, theta: float, scaling: Optional[dict]) -> torch.Tensor:
    inv_freq = _default_inv_freq(head_dim, theta)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: Optional[dict]):
        super().__init__()
        self._args = (head_dim, max_positions, theta, scaling)
        # Not parameters: excluded from state_dict and moved with the module.
        self.register_buffer("cos_cache", torch.empty(0), persistent=False)
        self.register_buffer("sin_cache", torch.empty(0), persistent=False)
        self.build_cache()

    def build_cache(self, device=None) -> None:
        """(Re)compute the tables; the loader calls it after building the model on the meta device."""
        head_dim, max_positions, theta, scaling = self._args
        inv_freq = compute_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1).to(device or self.cos_cache.device)
        self.cos_cache, self.sin_cache = emb.cos(), emb.sin()

    def for_positions(self, positions: torch.Tensor, dtype: torch.dtype) -> "RotaryStep":
        """The rotation for one step's tokens, shared by every layer."""
        return RotaryStep(self, positions, dtype)


class RotaryStep:
    def __init__(self, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype):
        self.rotary, self.positions, self.dtype = rotary, positions, dtype
        self._tables: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_dim]; on CPU in place (x may be a view of the QKV output)."""
        r = self.rotary
        if rotary_inplace(x, self.positions, r.cos_cache, r.sin_cache):
            return x
        if self._tables is None:  # [T, 1, head_dim], broadcast over heads; gathered once per step
            self._tables = (r.cos_cache[self.positions].to(self.dtype).unsqueeze(1),
                            r.sin_cache[self.positions].to(self.dtype).unsqueeze(1))
        cos, sin = self._tables
        return x * cos + _rotate_half(x) * sin
