"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) in freight's own layers.

The families differ only in a few switches: QKV bias (Qwen2), per-head q/k RMSNorm
(Qwen3), sliding windows (Mistral) and rope scaling (Llama 3); one module covers all.
Q/K/V and gate/up projections are fused into single matmuls; the loader maps the
Hugging Face checkpoint names onto the fused weights (see `stacked_params`). Under
tensor parallelism each rank holds its heads and channels (layers/parallel_linear.py).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from freight.layers.attention import AttentionMetadata, PagedAttention
from freight.distributed.parallel_state import get_tp_group, split_units
from freight.layers.parallel_linear import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                                            VocabParallelEmbedding)
from freight.layers.norm import RMSNorm
from freight.kernels import silu_and_mul
from freight.kernels.decode_layers import FusedDecodeLayers
from freight.layers.rotary import RotaryEmbedding, RotaryStep, rope_type_of
from freight.model_config import ModelConfig


class Attention(nn.Module):
    """GQA attention over this rank's heads. Gemma and Phi-3 reuse it through the keyword arguments and
    the classes of their fused Q/K/V layer and q/k norms."""

    qkv_cls = ColumnParallelLinear
    norm_cls = RMSNorm

    def __init__(self, cfg: ModelConfig, qkv_bias: bool, qk_norm: bool, sliding_window: Optional[int],
                 scale: Optional[float] = None, logit_softcap: Optional[float] = None, o_bias: bool = False):
        super().__init__()
        tp = get_tp_group()
        d = self.head_dim = cfg.head_dim
        self.num_heads = split_units(cfg.num_heads, tp.world_size, tp.rank)[1]  # this rank's
        self.num_kv_heads = split_units(cfg.num_kv_heads, tp.world_size, tp.rank)[1]
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        self.qkv_proj = self.qkv_cls(cfg.hidden_size, [(cfg.num_heads, d), (cfg.num_kv_heads, d),
                                                       (cfg.num_kv_heads, d)], bias=qkv_bias)
        self.o_proj = RowParallelLinear(cfg.num_heads, d, cfg.hidden_size, bias=o_bias)
        self.q_norm = self.norm_cls(d, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = self.norm_cls(d, cfg.rms_norm_eps) if qk_norm else None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d, scale=d ** -0.5 if scale is None else scale,
                                   sliding_window=sliding_window, logit_softcap=logit_softcap)

    def forward(self, x, rope: RotaryStep, kv_cache, meta: AttentionMetadata):
        t, h, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size:].view(t, hkv, d)
        if self.q_norm is None:
            # q and k side by side in the QKV output: one rotation (in place on CPU) for both.
            qk = rope.apply(qkv[:, :self.q_size + self.kv_size].view(t, h + hkv, d))
            q, k = qk[:, :h], qk[:, h:]
        else:
            q = rope.apply(self.q_norm(qkv[:, :self.q_size].view(t, h, d)))
            k = rope.apply(self.k_norm(qkv[:, self.q_size:self.q_size + self.kv_size].view(t, hkv, d)))
        o = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    gate_up_cls = ColumnParallelLinear  # Phi-3: its checkpoint's fused gate_up

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} (only silu)")
        self.gate_up_proj = self.gate_up_cls(cfg.hidden_size, [(cfg.intermediate_size, 1)] * 2, bias=False)
        self.intermediate = self.gate_up_proj.local_sizes[0]  # this rank's channels
        self.down_proj = RowParallelLinear(cfg.intermediate_size, 1, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        h = silu_and_mul(gate_up)
        if h is None:
            gate, up = gate_up.split(self.intermediate, dim=-1)
            h = F.silu(gate) * up
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer around any attention and MLP (dense, mixture of experts, Phi-3's fused)."""

    def __init__(self, cfg: ModelConfig, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x, residual: Optional[torch.Tensor], rope: RotaryStep, kv_cache, meta):
        """Returns (this layer's output, the residual stream before it); the next norm adds them."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Also serves Mistral; subclasses flip the Qwen switches."""

    qkv_bias: Optional[bool] = None  # None: from config.attention_bias
    qk_norm = False

    # checkpoint name fragment -> (fused parameter fragment, shard index)
    stacked_params = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        qkv_bias = cfg.attention_bias if self.qkv_bias is None else self.qkv_bias
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, Attention(cfg, qkv_bias, self.qk_norm, cfg.sliding_windows[i]),
                                                 MLP(cfg))
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size)
        self.tie_weights()
        if rope_type_of(cfg.rope_scaling) == "longrope":  # its long/short switch lives in models/phi3.py
            raise ValueError(f"{cfg.architecture} with longrope rope scaling is not supported (Phi-3 is)")
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self._fused: Optional[FusedDecodeLayers] = None
        self._fused_checked = False

    def tie_weights(self) -> None:
        """Tied checkpoints have no lm_head tensor; the head reads the embedding matrix."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def checkpoint_name(self, name: str) -> str:
        """Map a Hugging Face tensor name onto this module's parameter names."""
        return name.removeprefix("model.")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states of the rows in logits_indices (compute_logits makes their logits)."""
        x = self.embed_tokens(input_ids)
        fused = self._fused_decode(x, positions, kv_caches, meta)
        if fused is not None:
            x, residual = fused
        else:
            rope = self.rotary.for_positions(positions, x.dtype)
            residual = None
            for layer, kv in zip(self.layers, kv_caches):
                x, residual = layer(x, residual, rope, kv, meta)
        x, _ = self.norm(x[logits_indices], residual[logits_indices])
        return x

    def _fused_decode(self, x, positions, kv_caches, meta):
        """The layers of a small step in one native call (kernels/decode_layers.py), where it applies."""
        if self._fused is None:
            if self._fused_checked or meta.prefills or os.environ.get("FREIGHT_FUSED_DECODE", "1") == "0":
                return None
            self._fused_checked = True  # (decided once the weights are packed: at the first decode step)
            self._fused = FusedDecodeLayers.build(self)
            if self._fused is None:
                return None
        return self._fused(x, positions, kv_caches, meta, self.rotary.cos_cache, self.rotary.sin_cache)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
