"""Phi-3 (Phi3ForCausalLM: Phi-3 mini/medium, Phi-3.5-mini, Phi-4-mini) in freight's own layers.

The decoder is Llama's (RMSNorm, SiLU gate/up MLP, GQA), but:
- the checkpoint already stores Q/K/V and gate/up fused (`qkv_proj`, `gate_up_proj`), so those
  layers' weight loader cuts the fused tensor into its parts and takes this rank's slice of
  each (FusedColumnParallelLinear);
- the rotary may be partial (`partial_rotary_factor`, e.g. Phi-4-mini): only the first
  dimensions of each head are rotated;
- `longrope` (old name `su`) scaling: short and long per-frequency factors, cos/sin scaled by
  an attention factor. transformers picks the factor set per forward pass from the sequence's
  length (long when max(position) + 1 > original_max_position_embeddings); freight makes the
  same choice per sequence and step: a token rotates with the long factors when its
  sequence, after this step, is longer than original_max_position_embeddings.
  Consequences (documented limits):
  * a prompt longer than the threshold prefilled in one chunk, and its decode steps, match
    transformers exactly; prompts and generations within the threshold use the short factors
    throughout, as transformers does;
  * a generation that crosses the threshold: the new tokens use the long factors while the
    keys already cached keep their short-factor rotation. That is what transformers' own
    cached forward does step by step, but `generate()` additionally drops its cache once the
    sequence reaches original_max + 1 tokens and re-encodes everything with the long factors
    (Phi3ForCausalLM.prepare_inputs_for_generation); freight does not re-encode;
  * a prompt beyond the threshold split into prefill chunks (or re-prefilled after
    preemption, or partly served from the prefix cache): the chunks that end within the
    threshold rotate with the short factors, where transformers would use the long ones.
- sliding window (`sliding_window`, e.g. 2047 in Phi-3-mini-4k) on every layer, as
  transformers' create_sliding_window_causal_mask applies it (ModelConfig.sliding_windows).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from freight.layers.attention import AttentionMetadata
from freight.layers.norm import RMSNorm
from freight.layers.parallel_linear import (CheckpointTensor, ColumnParallelLinear, ParallelLMHead,
                                            VocabParallelEmbedding, _copy)
from freight.layers.rotary import RotaryEmbedding, RotaryStep, rope_type_of
from freight.model_config import ModelConfig
from freight.models.llama import MLP, Attention, DecoderLayer, LlamaForCausalLM


class FusedColumnParallelLinear(ColumnParallelLinear):
    """A ColumnParallelLinear whose checkpoint tensor is already the fused one: parts of
    (units, unit_size) stacked along dim 0. The loader narrows the tensor to each part's rows,
    then to this rank's units of that part."""

    def __init__(self, in_features: int, shards: list[tuple[int, int]], bias: bool):
        super().__init__(in_features, shards, bias)
        self.full_sizes = [units * size for units, size in shards]
        self.num_shards = 1  # one checkpoint tensor per parameter

    def weight_loader(self, name: str, param: nn.Parameter, loaded: CheckpointTensor,
                      shard: Optional[int] = None) -> None:
        if loaded.shape[0] != sum(self.full_sizes):
            raise ValueError(f"has shape {tuple(loaded.shape)}; expected {sum(self.full_sizes)} rows "
                             f"(fused parts of {self.full_sizes} rows)")
        part_start, local_start = 0, 0
        for (first, count), size, full, local in zip(self.splits, self.unit_sizes, self.full_sizes,
                                                     self.local_sizes):
            _copy(param.data.narrow(0, local_start, local),
                  loaded.narrow(0, part_start + first * size, count * size), loaded)
            part_start += full
            local_start += local


def _rope_config(cfg: ModelConfig) -> tuple[int, Optional[dict]]:
    """(rotated dimensions per head, rope scaling with original_max_position_embeddings filled in)."""
    raw = cfg.raw
    params = raw.get("rope_parameters") or {}
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    factor = (scaling or {}).get("partial_rotary_factor",
                                 params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    rotary_dim = int(cfg.head_dim * (factor if factor is not None else 1.0))
    if scaling is not None and rope_type_of(scaling) == "longrope":
        # transformers' Phi3Config gives the top-level field priority (and defaults it to 4096)
        original = (raw.get("original_max_position_embeddings")
                    or scaling.get("original_max_position_embeddings") or 4096)
        scaling["original_max_position_embeddings"] = original
        for key in ("short_factor", "long_factor"):
            if len(scaling.get(key) or []) != rotary_dim // 2:
                raise ValueError(f"longrope {key} must list {rotary_dim // 2} numbers (rotary dims / 2), got "
                                 f"{len(scaling.get(key) or [])}")
    return rotary_dim, scaling


class Phi3Attention(Attention):
    """Llama's attention on the checkpoint's fused qkv_proj, with a possibly partial rotary."""

    qkv_cls = FusedColumnParallelLinear

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary_dim: int):
        super().__init__(cfg, qkv_bias=False, qk_norm=False, sliding_window=cfg.sliding_windows[layer_idx])
        self.rotary_dim = rotary_dim

    def forward(self, x, rope: RotaryStep, kv_cache, meta: AttentionMetadata):
        t, h, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size:].view(t, hkv, d)
        qk = qkv[:, :self.q_size + self.kv_size].view(t, h + hkv, d)
        if self.rotary_dim == d:
            qk = rope.apply(qk)
        else:  # partial rotary: the first rotary_dim dimensions of each head
            part = qk[..., :self.rotary_dim]
            out = rope.apply(part)
            if out is not part:
                part.copy_(out)
        o = self.attn(qk[:, :h], qk[:, h:], v, kv_cache, meta)
        return self.o_proj(o.reshape(t, self.q_size))


class Phi3MLP(MLP):
    gate_up_cls = FusedColumnParallelLinear


class Phi3ForCausalLM(nn.Module):
    stacked_params: dict = {}  # the checkpoint's qkv_proj / gate_up_proj are already fused

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.attention_bias:
            raise ValueError("Phi3ForCausalLM with attention_bias is not supported")
        self.cfg = cfg
        rotary_dim, scaling = _rope_config(cfg)
        self.original_max_positions = (scaling or {}).get("original_max_position_embeddings")
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, Phi3Attention(cfg, i, rotary_dim), Phi3MLP(cfg))
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size)
        self.tie_weights()
        self.rotary = RotaryEmbedding(rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, scaling)

    tie_weights = LlamaForCausalLM.tie_weights
    checkpoint_name = LlamaForCausalLM.checkpoint_name

    def rope_rows(self, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Rows of the rotary tables: with longrope, the long-factor rows for every token of a
        sequence longer than original_max_position_embeddings after this step."""
        offset = self.rotary.long_offset
        if offset is None:
            return positions
        limit = self.original_max_positions
        long = torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
        if meta.num_decodes:
            long[:meta.num_decodes] = meta.decode_seq_lens.to(positions.device) > limit
        for chunk in meta.prefills:
            if chunk.seq_len > limit:
                long[chunk.start:chunk.end] = True
        return positions + long.to(positions.dtype) * offset

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.for_positions(self.rope_rows(positions, meta), x.dtype)
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, kv, meta)
        x, _ = self.norm(x[logits_indices], residual[logits_indices])
        return x  # final-normed hidden rows; compute_logits makes their logits

    compute_logits = LlamaForCausalLM.compute_logits
