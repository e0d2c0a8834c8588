"""Mixtral (MixtralForCausalLM) in freight's own layers: Llama/Mistral attention, and a sparse
mixture-of-experts block (layers/moe.py) in place of every MLP.

Checkpoint names: the Hub's `block_sparse_moe.gate.weight` (router) and
`block_sparse_moe.experts.N.w1/w3/w2.weight` (gate/up/down of expert N) load into the stacked
expert weights; so do transformers 5's in-memory names (`mlp.gate.weight`,
`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`). Routing: softmax over all experts, top-k,
always renormalised.
"""

from __future__ import annotations

from torch import nn

from freight.layers.moe import FusedMoE, expert_stacked_params
from freight.layers.norm import RMSNorm
from freight.layers.parallel_linear import ParallelLMHead, VocabParallelEmbedding
from freight.layers.rotary import RotaryEmbedding, rope_type_of
from freight.model_config import ModelConfig
from freight.models.llama import Attention, DecoderLayer, LlamaForCausalLM


def moe_checkpoint_name(name: str) -> str:
    """Hugging Face names -> freight's: 'model.' dropped, Mixtral's block_sparse_moe is 'mlp', and
    transformers 5's stacked expert tensors go to the stacked weights."""
    name = name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")
    if name.endswith(".experts.gate_up_proj"):
        return name.removesuffix("_proj") + ".weight"
    if name.endswith(".experts.down_proj"):
        return name.removesuffix("_proj") + ".weight"
    return name


class MoEForCausalLM(nn.Module):
    """The shared skeleton of the MoE models: subclasses build each layer's mlp (`make_mlp`)."""

    qk_norm = False
    # per-expert checkpoint names (gate, up, down) under 'experts.N.'
    expert_names = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} (only silu)")
        self.cfg = cfg
        self.num_experts = self.config_num_experts(cfg)
        # per-expert entries first: the loader takes the first fragment that matches
        self.stacked_params = {**expert_stacked_params(self.num_experts, *self.expert_names),
                               **LlamaForCausalLM.stacked_params}
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        qkv_bias = self.config_qkv_bias(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, Attention(cfg, qkv_bias, self.qk_norm, cfg.sliding_windows[i]), self.make_mlp(cfg, i))
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size)
        self.tie_weights()
        if rope_type_of(cfg.rope_scaling) == "longrope":
            raise ValueError(f"{cfg.architecture} with longrope rope scaling is not supported")
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)

    @staticmethod
    def config_num_experts(cfg: ModelConfig) -> int:
        raise NotImplementedError

    @staticmethod
    def config_qkv_bias(cfg: ModelConfig) -> bool:
        return cfg.attention_bias

    def make_mlp(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    tie_weights = LlamaForCausalLM.tie_weights
    forward = LlamaForCausalLM.forward
    _fused_decode = LlamaForCausalLM._fused_decode
    _fused, _fused_checked = None, True  # (the native decode driver has no MoE layers)
    compute_logits = LlamaForCausalLM.compute_logits

    def checkpoint_name(self, name: str) -> str:
        return moe_checkpoint_name(name)


class MixtralForCausalLM(MoEForCausalLM):
    expert_names = ("w1", "w3", "w2")

    @staticmethod
    def config_num_experts(cfg: ModelConfig) -> int:
        return cfg.raw["num_local_experts"]

    def make_mlp(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        return FusedMoE(self.num_experts, cfg.raw["num_experts_per_tok"], cfg.hidden_size, cfg.intermediate_size,
                        renormalize=True, weights_in_float32=True)
