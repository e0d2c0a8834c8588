"""ModelConfig: the fields of a Hugging Face config.json that freight's models use.

Read from the JSON directly (not through transformers' config classes) so the same
code handles configs written by transformers 4.x (rope_scaling, rope_theta) and
5.x (rope_parameters).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


# config.json keys with no default: the model's shape cannot be guessed without them.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_windows: list[Optional[int]]  # per layer; None = full attention
    torch_dtype: Optional[str]
    hidden_act: str
    raw: dict

    def kv_heads_per_rank(self, tensor_parallel_size: int) -> int:
        """KV heads each rank caches: its share, or one replicated head when there are fewer than ranks."""
        return max(self.num_kv_heads // tensor_parallel_size, 1)

    def check_tensor_parallel(self, tp: int) -> None:
        """A clear error when this model cannot be split over tp ranks (before any rank starts)."""
        if tp < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {tp}")
        problems = []
        if self.num_heads % tp:
            problems.append(f"{self.num_heads} attention heads")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            problems.append(f"{self.num_kv_heads} KV heads (neither a multiple nor a divisor of {tp})")
        if self.intermediate_size % tp:
            problems.append(f"intermediate size {self.intermediate_size}")
        for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):  # experts split like MLPs
            size = self.raw.get(key)
            if size and size % tp:
                problems.append(f"{key} {size}")
        if problems:
            raise ValueError(f"{self.architecture} cannot be split over {tp} tensor-parallel ranks: "
                             f"{', '.join(problems)} do not divide evenly")

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in model directory {model_dir}")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; cannot tell which model to build")
        # lazy: the model modules import this one. An unsupported model fails on its name, not on a field it
        # lacks; one freight has no class for may still run on the Transformers backend.
        from freight.models.transformers_backend import check_architecture
        check_architecture(archs[0], cfg)
        quant = cfg.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "an unknown method")
            raise ValueError(f"this checkpoint is quantized with {method} (quantization_config in config.json), "
                             "which freight cannot load; use an unquantized (float16/bfloat16/float32) checkpoint "
                             "(--quantization int8 then quantizes its weights to int8 as it loads)")
        missing = [k for k in REQUIRED_KEYS if k not in cfg]
        if missing:
            raise ValueError(f"config.json of {archs[0]} lacks {', '.join(map(repr, missing))}; "
                             f"freight needs {', '.join(REQUIRED_KEYS)} to build the model")
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        num_layers = cfg["num_hidden_layers"]
        return cls(
            architecture=archs[0],
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            sliding_windows=_sliding_windows(cfg, num_layers),
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            hidden_act=cfg.get("hidden_act", "silu"),
            raw=cfg,
        )


def _sliding_windows(cfg: dict, num_layers: int) -> list[Optional[int]]:
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if "use_sliding_window" in cfg:  # Qwen2/Qwen3: off unless asked, and only from max_window_layers on
        if not cfg["use_sliding_window"] or window is None:
            return [None] * num_layers
        first = cfg.get("max_window_layers", num_layers)
        return [window if i >= first else None for i in range(num_layers)]
    return [window] * num_layers  # Mistral: every layer when set
