"""The Transformers backend: any decoder-only causal LM that transformers implements, on freight's engine.

Like vLLM's Transformers backend. The Hugging Face model is built from its config on the
meta device (no random init, no copy of the weights), materialised on the target device,
and filled from the checkpoint's safetensors. Its attention layers call
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`; freight registers "freight_paged"
there, which hands each layer's q/k/v to a PagedAttention over the step's KV cache, so
paged KV, continuous batching, chunked prefill, prefix caching and preemption all work
unchanged. The step's flat batch is one "sequence" of T tokens (batch dim 1); since
"freight_paged" has no mask function, transformers builds no causal mask (it would be
wrong for a flat batch): PagedAttention applies each sequence's causality itself.

`model_impl`: "freight" = freight's own class (models/registry.py), "transformers" = this
backend, "auto" = the own class when there is one, else this backend.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from freight.layers.attention import AttentionMetadata, PagedAttention
from freight.model_config import REQUIRED_KEYS, ModelConfig

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "freight_paged"
MODEL_IMPLS = ("auto", "freight", "transformers")

_step = threading.local()  # .model, .kv_caches, .meta: set by TransformersForCausalLM.forward


def _hf_model_class(architecture: str):
    import transformers

    cls = getattr(transformers, architecture, None)
    if cls is None or not isinstance(cls, type):
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return cls if architecture in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) else None


def transformers_unsupported_reason(architecture: str, raw: Optional[dict] = None) -> Optional[str]:
    """Why the Transformers backend cannot serve this architecture, or None if it can."""
    cls = _hf_model_class(architecture)
    if cls is None:
        return f"transformers has no causal LM class {architecture!r}"
    if not getattr(cls, "_supports_attention_backend", False):
        return (f"{architecture}'s attention does not go through transformers' attention interface "
                "(_supports_attention_backend is False), so freight's paged attention cannot replace it")
    if raw is not None:
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            return f"its config.json lacks {', '.join(map(repr, missing))}, which freight needs to size the KV cache"
    return None


def _registry_error(architecture: str) -> str:
    from freight.models.registry import MODEL_REGISTRY
    return f"unsupported architecture {architecture!r}; freight supports: {', '.join(sorted(MODEL_REGISTRY))}"


def check_architecture(architecture: str, raw: dict) -> None:
    """For ModelConfig: an architecture is accepted if freight has a class for it or the backend can serve it."""
    from freight.models.registry import MODEL_REGISTRY
    if architecture in MODEL_REGISTRY:
        return
    reason = transformers_unsupported_reason(architecture, raw)
    if reason is not None:
        raise ValueError(f"{_registry_error(architecture)}; nor can its Transformers backend serve it: {reason}")


def resolve_model_impl(architecture: str, model_impl: str = "auto") -> str:
    """'freight' or 'transformers': which implementation serves this architecture (or a clear error)."""
    from freight.models.registry import MODEL_REGISTRY, resolve_model_class
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {', '.join(MODEL_IMPLS)}, got {model_impl!r}")
    if model_impl == "freight" or (model_impl == "auto" and architecture in MODEL_REGISTRY):
        resolve_model_class(architecture)  # the registry's error when there is no native class
        return "freight"
    reason = transformers_unsupported_reason(architecture)
    if reason is not None:
        prefix = (_registry_error(architecture) + "; nor can its Transformers backend serve it"
                  if model_impl == "auto" else f"model_impl='transformers' cannot serve {architecture}")
        raise ValueError(f"{prefix}: {reason}")
    return "transformers"


def _freight_paged_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                             dropout: float = 0.0, sliding_window: Optional[int] = None,
                             softcap: Optional[float] = None, **kwargs):
    """transformers' attention-function signature: query [1, H, T, D], key/value [1, Hkv, T, D]
    -> ([1, T, H, D], None). T is the step's whole flat batch."""
    model = getattr(_step, "model", None)
    if model is None:
        raise RuntimeError("freight_paged attention called outside a freight forward pass")
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise ValueError(f"{type(module).__name__} has no layer_idx; the Transformers backend cannot tell "
                         "which KV cache it uses")
    if query.shape[0] != 1:
        raise ValueError(f"freight_paged attention expects a batch of 1 (the flat batch), got {query.shape[0]}")
    attn = model.paged_attention(layer_idx, query.shape[1], key.shape[1], query.shape[-1],
                                 scaling if scaling is not None else query.shape[-1] ** -0.5,
                                 sliding_window, softcap)
    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    out = attn(q, k, v, _step.kv_caches[layer_idx], _step.meta)
    return out[None], None


def _register_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_IMPLEMENTATION, _freight_paged_attention)


class TransformersForCausalLM(nn.Module):
    """freight's model interface around a transformers *ForCausalLM (built on whatever device is current)."""

    stacked_params: dict = {}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        from freight.distributed.parallel_state import get_tp_group
        if get_tp_group().world_size > 1:
            raise ValueError("the Transformers backend (model_impl='transformers') does not support tensor "
                             "parallelism; use tensor_parallel_size=1")
        reason = transformers_unsupported_reason(cfg.architecture)
        if reason is not None:
            raise ValueError(f"model_impl='transformers' cannot serve {cfg.architecture}: {reason}")
        _register_attention()
        self.cfg = cfg
        raw = {k: v for k, v in cfg.raw.items() if k not in ("architectures", "model_type")}
        hf_config = AutoConfig.for_model(cfg.raw["model_type"], **raw)
        hf_config.architectures = [cfg.architecture]
        self.hf_config = hf_config
        self.model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=ATTN_IMPLEMENTATION,
                                                      dtype=torch.get_default_dtype())
        if self.model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"{cfg.architecture} did not take freight's attention implementation "
                             f"(it uses {self.model.config._attn_implementation!r})")
        self._attn: dict[int, PagedAttention] = {}

    # -- freight's model interface ---------------------------------------------
    def tie_weights(self) -> None:
        if getattr(self.model.config, "tie_word_embeddings", False):
            out, inp = self.model.get_output_embeddings(), self.model.get_input_embeddings()
            out.weight = inp.weight

    def checkpoint_name(self, name: str) -> str:
        return name

    def paged_attention(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                        sliding_window: Optional[int], softcap: Optional[float]) -> PagedAttention:
        attn = self._attn.get(layer_idx)
        if attn is None:
            k_cache = _step.kv_caches[layer_idx][0]
            if k_cache.shape[0] != num_kv_heads or k_cache.shape[-1] != head_dim:
                raise ValueError(f"layer {layer_idx} of {self.cfg.architecture} has {num_kv_heads} KV heads of "
                                 f"size {head_dim}, but its config.json implies a KV cache of {k_cache.shape[0]} "
                                 f"heads of size {k_cache.shape[-1]}")
            attn = self._attn[layer_idx] = PagedAttention(num_heads, num_kv_heads, head_dim, scale=scale,
                                                          sliding_window=sliding_window, logit_softcap=softcap)
        return attn

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        _step.model, _step.kv_caches, _step.meta = self, kv_caches, meta
        try:
            out = self.model.base_model(input_ids=input_ids[None], position_ids=positions[None],
                                        attention_mask=None, use_cache=False)
        finally:
            _step.model = _step.kv_caches = _step.meta = None
        return out.last_hidden_state[0][logits_indices]  # final-normed; compute_logits makes the logits

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.hf_config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def load_transformers_model(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype,
                            device: torch.device) -> TransformersForCausalLM:
    from freight.model_loader import build_empty, iterate_weights

    model = build_empty(TransformersForCausalLM, cfg, dtype, device)
    hf = model.model
    # Non-persistent buffers (rotary inv_freq, embedding scales...) are not in the checkpoint: to_empty left
    # them uninitialised. The model's own _init_weights recomputes them (it randomises the parameters of
    # those modules too, which the checkpoint then overwrites).
    with torch.no_grad():
        for m in hf.modules():
            if getattr(m, "_non_persistent_buffers_set", None):
                hf._init_weights(m)
    params = dict(hf.named_parameters())
    params.update((n, b) for n, b in hf.named_buffers() if n in hf.state_dict())
    tied = getattr(hf.config, "tie_word_embeddings", False)
    renamed = [n for n, _ in iterate_weights(model_dir)  # (headers only: tensors are read lazily)
               if n not in params and "rotary_emb" not in n and not (tied and n.endswith("lm_head.weight"))]
    if renamed:
        # The checkpoint's layout differs from the module's (e.g. one tensor per MoE expert where
        # transformers 5 stacks them): transformers' own loader knows the conversion.
        logger.info("%s: checkpoint names such as %r need transformers' weight conversion; loading with "
                    "from_pretrained", cfg.architecture, renamed[0])
        model.model = _from_pretrained(model_dir, cfg, dtype, device)
        return model.eval()
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in iterate_weights(model_dir):
            if "rotary_emb" in name:
                continue
            target = params.get(name)
            if target is None:
                if tied and name.endswith("lm_head.weight"):
                    continue
                raise ValueError(f"checkpoint tensor {name!r} has no place in {cfg.architecture}")
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"{cfg.architecture} expects {tuple(target.shape)}")
            target.copy_(tensor.full())
            loaded.add(name)
    missing = sorted(set(n for n, _ in hf.named_parameters()) - loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return model.eval()


def _from_pretrained(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, output_loading_info=True,
                                                    attn_implementation=ATTN_IMPLEMENTATION)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ValueError(f"checkpoint in {model_dir} does not fit {cfg.architecture}: {problems}")
    return hf.to(device).eval()
