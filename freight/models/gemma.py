"""Gemma 2 and Gemma 3 (text) decoders in freight's own layers.

What sets them apart from the Llama family (models/llama.py), following transformers'
modeling_gemma2.py / modeling_gemma3.py step for step:
- embeddings scaled by sqrt(hidden_size), rounded to the model dtype as transformers does;
- RMSNorm as x * (1 + weight), in float32, and four of them per layer: the attention and
  MLP outputs are normed *before* they join the residual stream (post-norms);
- a GeGLU MLP (gelu, tanh approximation);
- attention scale query_pre_attn_scalar ** -0.5; sliding-window and global layers alternate
  (layer_types, else every other layer for Gemma 2, every sliding_window_pattern-th global
  for Gemma 3);
- Gemma 2: attention logit soft-capping (PagedAttention's explicit path) and final logit
  soft-capping;
- Gemma 3: per-head q/k norms; sliding layers use their own RoPE base (10000 by default),
  global ones rope_theta with its scaling. transformers 5 writes these as rope_parameters
  keyed by layer type; older configs as rope_theta / rope_local_base_freq / rope_scaling.
Q/K/V and gate/up are fused as in llama.py, and tensor parallelism works the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from freight.layers.attention import AttentionMetadata
from freight.layers.parallel_linear import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                                            VocabParallelEmbedding)
from freight.layers.rotary import RotaryEmbedding, RotaryStep
from freight.model_config import ModelConfig
from freight.models.llama import Attention, LlamaForCausalLM


class GemmaRMSNorm(nn.Module):
    """x * (1 + weight), all in float32, rounded to x's dtype at the end (transformers' Gemma2RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def _layer_is_sliding(raw: dict, gemma3: bool) -> list[bool]:
    n = raw["num_hidden_layers"]
    if raw.get("sliding_window") is None:
        return [False] * n
    types = raw.get("layer_types")
    if types:
        return [t == "sliding_attention" for t in types]
    pattern = raw.get("sliding_window_pattern", 6) if gemma3 else 2
    return [bool((i + 1) % pattern) for i in range(n)]


def _rope_settings(cfg: ModelConfig, gemma3: bool) -> tuple[tuple[float, Optional[dict]], tuple[float, Optional[dict]]]:
    """((theta, scaling) of global layers, (theta, scaling) of sliding layers)."""
    if not gemma3:
        return ((cfg.rope_theta, cfg.rope_scaling),) * 2
    raw = cfg.raw
    params = raw.get("rope_parameters") or {}

    def split(p: Optional[dict], default_theta: float) -> tuple[float, Optional[dict]]:
        p = dict(p or {})
        theta = float(p.pop("rope_theta", default_theta))
        kind = p.get("rope_type", p.get("type", "default"))
        return theta, (p if kind != "default" else None)

    if "full_attention" in params or "sliding_attention" in params:
        return (split(params.get("full_attention"), 1_000_000.0),
                split(params.get("sliding_attention"), 10_000.0))
    glob = dict(raw.get("rope_scaling") or {})
    glob["rope_theta"] = raw.get("rope_theta", params.get("rope_theta", 1_000_000.0))
    return split(glob, 1_000_000.0), (float(raw.get("rope_local_base_freq", 10_000.0)), None)


class GemmaAttention(Attention):
    """Llama's attention with (1 + w) q/k norms, query_pre_attn_scalar and Gemma 2's soft-cap."""

    norm_cls = GemmaRMSNorm

    def __init__(self, cfg: ModelConfig, sliding: bool, qk_norm: bool, softcap: Optional[float]):
        raw = cfg.raw
        bias = bool(raw.get("attention_bias", False))
        super().__init__(cfg, bias, qk_norm, raw.get("sliding_window") if sliding else None,
                         scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5, logit_softcap=softcap,
                         o_bias=bias)
        self.sliding = sliding


class GemmaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        act = cfg.raw.get("hidden_activation") or cfg.raw.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_python_tanh", "gelu_new", "gelu_fast"):
            raise ValueError(f"unsupported hidden_activation {act!r} (only gelu_pytorch_tanh)")
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [(cfg.intermediate_size, 1)] * 2, bias=False)
        self.intermediate = self.gate_up_proj.local_sizes[0]
        self.down_proj = RowParallelLinear(cfg.intermediate_size, 1, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding: bool, qk_norm: bool, softcap: Optional[float]):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = GemmaAttention(cfg, sliding, qk_norm, softcap)
        self.mlp = GemmaMLP(cfg)
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, x, rope: RotaryStep, kv_cache, meta):
        # transformers' order exactly: each sublayer's output is normed, then added in the model dtype.
        h = self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma2ForCausalLM(nn.Module):
    gemma3 = False

    stacked_params = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        raw = cfg.raw
        # Gemma configs tie the head to the embeddings unless they say otherwise.
        cfg = dataclasses.replace(cfg, tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)))
        self.cfg = cfg
        sliding = _layer_is_sliding(raw, self.gemma3)
        attn_cap = None if self.gemma3 else raw.get("attn_logit_softcapping")  # transformers' Gemma 3 ignores it
        self.final_softcap = raw.get("final_logit_softcapping")
        self.normalizer = cfg.hidden_size ** 0.5
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, sliding[i], self.gemma3, attn_cap)
                                    for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size)
        self.tie_weights()
        (g_theta, g_scaling), (l_theta, l_scaling) = _rope_settings(cfg, self.gemma3)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, g_theta, g_scaling)
        self.rotary_local = (RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, l_theta, l_scaling)
                             if self.gemma3 else None)

    tie_weights = LlamaForCausalLM.tie_weights
    checkpoint_name = LlamaForCausalLM.checkpoint_name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.normalizer, dtype=x.dtype, device=x.device)
        rope_global = self.rotary.for_positions(positions, x.dtype)
        rope_local = self.rotary_local.for_positions(positions, x.dtype) if self.rotary_local else rope_global
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, rope_local if layer.self_attn.sliding else rope_global, kv, meta)
        return self.norm(x[logits_indices])  # final-normed hidden rows; compute_logits makes their logits

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_softcap is not None:
            cap = self.final_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    gemma3 = True
