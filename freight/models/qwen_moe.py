"""Qwen2-MoE (Qwen2MoeForCausalLM) and Qwen3-MoE (Qwen3MoeForCausalLM) in freight's own layers.

Attention is Qwen2's (QKV bias per config.qkv_bias) or Qwen3's (per-head q/k RMSNorm, bias per
config.attention_bias). A layer's MLP is sparse (layers/moe.py, `moe_intermediate_size` per
expert) when it is not in `mlp_only_layers` and (layer + 1) % decoder_sparse_step == 0, else
a dense SiLU MLP of `intermediate_size`. Routing: softmax, top-k, renormalised when
norm_topk_prob. Qwen2-MoE adds a shared expert (`shared_expert_intermediate_size`) weighted
by sigmoid(shared_expert_gate(x)); under tensor parallelism its partial sum and the experts'
are all-reduced together, once.

Checkpoint names: `mlp.gate.weight`, `mlp.experts.N.gate_proj/up_proj/down_proj.weight`,
`mlp.shared_expert.*`, `mlp.shared_expert_gate.weight` (Hub and transformers 5's
save_pretrained), or transformers 5's stacked `mlp.experts.gate_up_proj` / `down_proj`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from freight.kernels import silu_and_mul
from freight.layers.linear import Linear
from freight.layers.moe import FusedMoE
from freight.layers.parallel_linear import ColumnParallelLinear, RowParallelLinear
from freight.model_config import ModelConfig
from freight.models.mixtral import MoEForCausalLM


class DenseMLP(nn.Module):
    """SiLU gate/up MLP of a given intermediate size (forward(x, reduce=False): this rank's partial sum)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [(intermediate, 1)] * 2, bias=False)
        self.intermediate = self.gate_up_proj.local_sizes[0]
        self.down_proj = RowParallelLinear(intermediate, 1, hidden, bias=False)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        h = silu_and_mul(gate_up)
        if h is None:
            gate, up = gate_up.split(self.intermediate, dim=-1)
            h = F.silu(gate) * up
        return self.down_proj(h) if reduce else Linear.forward(self.down_proj, h)


class SparseMoeBlock(FusedMoE):
    """Router + experts, plus Qwen2-MoE's gated shared expert when shared_intermediate > 0.
    Names follow the checkpoint: gate, experts, shared_expert, shared_expert_gate."""

    def __init__(self, cfg: ModelConfig, num_experts: int, shared_intermediate: int):
        raw = cfg.raw
        super().__init__(num_experts, raw["num_experts_per_tok"], cfg.hidden_size, raw["moe_intermediate_size"],
                         renormalize=bool(raw.get("norm_topk_prob", False)))
        if shared_intermediate:
            self.shared_expert = DenseMLP(cfg.hidden_size, shared_intermediate)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x, reduce=False)
        if self.shared_expert is not None:
            shared = self.shared_expert(x, reduce=False)
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
        return self.tp.all_reduce(out) if self.tp.world_size > 1 else out


class Qwen2MoeForCausalLM(MoEForCausalLM):
    qk_norm = False

    @staticmethod
    def config_qkv_bias(cfg: ModelConfig) -> bool:
        return bool(cfg.raw.get("qkv_bias", True))

    @staticmethod
    def config_num_experts(cfg: ModelConfig) -> int:
        # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts
        raw = cfg.raw
        return raw.get("num_experts", raw.get("num_local_experts")) or 0

    def is_sparse(self, cfg: ModelConfig, layer_idx: int) -> bool:
        raw = cfg.raw
        return (layer_idx not in (raw.get("mlp_only_layers") or []) and self.num_experts > 0
                and (layer_idx + 1) % raw.get("decoder_sparse_step", 1) == 0)

    def shared_intermediate(self, cfg: ModelConfig) -> int:
        return cfg.raw.get("shared_expert_intermediate_size") or 0

    def make_mlp(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        if self.is_sparse(cfg, layer_idx):
            return SparseMoeBlock(cfg, self.num_experts, self.shared_intermediate(cfg))
        return DenseMLP(cfg.hidden_size, cfg.intermediate_size)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    qk_norm = True

    @staticmethod
    def config_qkv_bias(cfg: ModelConfig) -> bool:
        return cfg.attention_bias

    def shared_intermediate(self, cfg: ModelConfig) -> int:
        return 0  # Qwen3-MoE has no shared expert
