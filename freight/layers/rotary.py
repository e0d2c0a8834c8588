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

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


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


def rope_type_of(scaling: Optional[dict]) -> str:
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    return "longrope" if rope_type == "su" else rope_type  # "su": LongRoPE's old name (Phi-3)


def _longrope_inv_freq(dim: int, theta: float, factors: list) -> torch.Tensor:
    """transformers' _compute_longrope_parameters: the default frequencies divided per pair."""
    ext = torch.tensor(factors, dtype=torch.float32)
    return 1.0 / (ext * theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def longrope_attention_factor(scaling: dict, max_positions: int) -> float:
    """cos/sin are scaled by this (transformers' default: from max / original max positions)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def compute_inv_freq(head_dim: int, theta: float, scaling: Optional[dict]) -> torch.Tensor:
    """head_dim: the rotated dimensions (all of a head's unless the rotary is partial).
    For longrope: the short-factor frequencies (RotaryEmbedding also tables the long ones)."""
    inv_freq = _default_inv_freq(head_dim, theta)
    rope_type = rope_type_of(scaling)
    if rope_type == "longrope":
        return _longrope_inv_freq(head_dim, theta, scaling["short_factor"])
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
    """With longrope the tables hold 2 * max_positions rows: the short-factor rotation of each
    position, then the long-factor one (row max_positions + p); the model picks the row
    (`long_offset`), since transformers switches factor on the sequence's length."""

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
        inv_freqs = [compute_inv_freq(head_dim, theta, scaling)]
        scale = 1.0
        if rope_type_of(scaling) == "longrope":
            inv_freqs.append(_longrope_inv_freq(head_dim, theta, scaling["long_factor"]))
            scale = longrope_attention_factor(scaling, max_positions)
        self.long_offset = max_positions if len(inv_freqs) > 1 else None
        freqs = torch.cat([torch.arange(max_positions, dtype=torch.float32)[:, None] * f[None, :] for f in inv_freqs])
        emb = torch.cat((freqs, freqs), dim=-1).to(device or self.cos_cache.device)
        if scale == 1.0:
            self.cos_cache, self.sin_cache = emb.cos(), emb.sin()
        else:
            self.cos_cache, self.sin_cache = emb.cos() * scale, emb.sin() * scale

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
