"""Engine configuration: what the user asks for, resolved into concrete settings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    from freight.spec_decode.config import SpeculativeConfig

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(value: Union[int, float, str]) -> int:
    """Bytes from an int or a string such as "2GiB", "512MiB" or "1.5GB"."""
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"memory size must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse memory size {value!r}; use bytes or e.g. '2GiB', '512MiB'")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return size


STRUCTURED_OUTPUT_FLAGS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties")


@dataclass
class EngineConfig:
    """Everything LLMEngine needs; the CLI, LLM() and the server all build one of these."""

    model: str
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    block_size: int = 16
    kv_cache_memory: Union[int, str, None] = None  # None: a default fraction of free memory
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    max_model_len: Optional[int] = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    trust_remote_code: bool = False
    served_model_name: Optional[str] = None
    num_threads: Optional[int] = None
    max_logprobs: int = 20  # vLLM's default cap on logprobs / prompt_logprobs per token
    # vLLM's structured_outputs_config: {"backend": "auto" | "xgrammar" | "guidance", and defaults for every
    # request: "disable_fallback", "disable_any_whitespace", "disable_additional_properties"}
    structured_outputs_config: Optional[dict] = None
    tensor_parallel_size: int = 1
    # How the tensor-parallel ranks run: "mp" (processes on this host) or "ray" (actors on a Ray
    # cluster); None: mp. Rank 0 always runs in the engine core's own process.
    distributed_executor_backend: Optional[str] = None
    # Which implementation runs the model: "freight" (its own classes), "transformers" (the Transformers
    # backend: any causal LM transformers implements, on freight's paged KV cache) or "auto" (freight's own
    # class when there is one for the architecture, else the Transformers backend).
    model_impl: str = "auto"
    # vLLM's --quantization, for a float checkpoint: "int8" quantizes the linear layers' weights as they load
    # (per-output-channel symmetric int8, float activations: freight/layers/quantization); None: as loaded.
    quantization: Optional[str] = None
    # Where requests' default sampling parameters come from (vLLM's generation_config): "auto" (the model's
    # generation_config.json), "vllm" (none) or a directory holding one; override_generation_config is laid
    # over it. See freight/generation_defaults.py.
    generation_config: str = "auto"
    override_generation_config: Optional[dict] = None
    # A request whose prompt + max_tokens exceeds max_model_len gets max_tokens lowered to what the context
    # leaves, instead of a 400 (a prompt that alone fills the context is still refused).
    clamp_max_tokens: bool = False
    # vLLM's --scheduling-policy: "fcfs" (arrival order) or "priority" (by each request's priority, lower
    # first, then arrival; the running request with the largest of those is preempted first).
    scheduling_policy: str = "fcfs"
    # vLLM's --speculative-config: {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": ...,
    # "prompt_lookup_min": ..., "disable_by_batch_size": ...} (a JSON string or a dict); None: no speculation.
    speculative_config: Union[None, str, dict, "SpeculativeConfig"] = None

    def __post_init__(self) -> None:
        from freight.spec_decode.config import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}")
        from freight.generation_defaults import check_generation_config_arg

        check_generation_config_arg(self.generation_config)
        if self.override_generation_config is not None and not isinstance(self.override_generation_config, dict):
            raise ValueError(f"override_generation_config must be a JSON object, got "
                             f"{self.override_generation_config!r}")
        from freight.layers.quantization import check_quantization

        check_quantization(self.quantization)
        if self.model_impl not in ("auto", "freight", "transformers"):
            raise ValueError(f"model_impl must be auto, freight or transformers, got {self.model_impl!r}")
        if self.model_impl == "transformers" and self.tensor_parallel_size > 1:
            raise ValueError("the Transformers backend (model_impl='transformers') does not support tensor "
                             "parallelism; use tensor_parallel_size=1 or model_impl='freight'")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.distributed_executor_backend not in (None, "mp", "ray", "uni"):
            raise ValueError(f"distributed_executor_backend must be mp or ray, got "
                             f"{self.distributed_executor_backend!r}")
        if self.distributed_executor_backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError("distributed_executor_backend 'uni' runs one rank; use mp or ray for tensor parallelism")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_size(self.kv_cache_memory)
        so = self.structured_outputs_config or {}
        keys = {"backend", *STRUCTURED_OUTPUT_FLAGS}
        if not isinstance(so, dict) or set(so) - keys:
            raise ValueError(f"structured_outputs_config takes the keys {', '.join(sorted(keys))}; got {so!r}")
        if so.get("backend", "auto") not in ("auto", "xgrammar", "guidance"):
            raise ValueError(f"structured outputs backend must be auto, xgrammar or guidance, got {so['backend']!r}")
        if any(not isinstance(so.get(k, False), bool) for k in STRUCTURED_OUTPUT_FLAGS):
            raise ValueError(f"structured_outputs_config: {', '.join(STRUCTURED_OUTPUT_FLAGS)} are booleans")

    @property
    def structured_outputs_backend(self) -> str:
        return (self.structured_outputs_config or {}).get("backend", "auto")

    def structured_output_defaults(self) -> dict[str, bool]:
        """The flags every request's structured outputs get (a request may turn them on, not off)."""
        so = self.structured_outputs_config or {}
        return {k: True for k in STRUCTURED_OUTPUT_FLAGS if so.get(k)}
