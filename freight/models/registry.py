"""Maps the `architectures` entry of config.json to freight's model classes."""

from __future__ import annotations

from torch import nn

from freight.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from freight.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from freight.models.mixtral import MixtralForCausalLM
from freight.models.phi3 import Phi3ForCausalLM
from freight.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def resolve_model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; freight supports: "
                         f"{', '.join(sorted(MODEL_REGISTRY))}") from None
