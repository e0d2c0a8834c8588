"""Default sampling parameters from a model's generation_config.json, as vLLM takes them.

`generation_config` says where they come from: "auto" (the model directory's
generation_config.json), "vllm" (none: SamplingParams' own neutral defaults) or a
directory holding a generation_config.json. `override_generation_config` is laid over
whichever it is (also over "vllm"). Of the result only the fields vLLM takes become
defaults (`do_sample` is ignored, as vLLM does: a request asks for greedy decoding with
temperature 0); `max_new_tokens` becomes `max_tokens`. They apply to a request only
where it leaves a field unset (see apply_defaults).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"
# The fields of a generation config vLLM turns into sampling defaults (ModelConfig.get_diff_sampling_param).
SAMPLING_FIELDS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")


def read_generation_config(directory: Path, required: bool = False) -> dict[str, Any]:
    """The values a generation_config.json in directory sets ({} without one, unless required)."""
    from transformers import GenerationConfig

    if not (Path(directory) / GENERATION_CONFIG_FILE).is_file():
        if required:
            raise ValueError(f"generation_config {str(directory)!r}: no {GENERATION_CONFIG_FILE} there")
        return {}
    try:
        # to_diff_dict(): only what the file sets (transformers' defaults are unset values).
        return GenerationConfig.from_pretrained(str(directory)).to_diff_dict()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {Path(directory) / GENERATION_CONFIG_FILE}: {e}") from None


def diff_sampling_params(generation_config: str, model_dir: Optional[Path],
                         override: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The sampling defaults in force: vLLM's get_diff_sampling_param (names as SamplingParams has them)."""
    if generation_config == "vllm" or (generation_config == "auto" and model_dir is None):
        config: dict[str, Any] = {}
    elif generation_config == "auto":
        config = read_generation_config(model_dir)
    else:
        config = read_generation_config(Path(generation_config), required=True)
    config.update(override or {})
    defaults = {k: config[k] for k in SAMPLING_FIELDS if config.get(k) is not None}
    if "max_new_tokens" in defaults:  # Hugging Face's max_new_tokens is vLLM's max_tokens
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    return defaults


def log_defaults(defaults: Mapping[str, Any], generation_config: str, overridden: bool = False) -> None:
    """Say at start-up which defaults requests get (vLLM logs them too)."""
    if not defaults:
        return
    sources = [] if generation_config == "vllm" else [
        "the model's generation_config.json" if generation_config == "auto" else generation_config]
    sources += ["override_generation_config"] if overridden else []
    logger.info("default sampling parameters from %s: %s (a request's own values take precedence; "
                "generation_config='vllm' ignores the model's)", " and ".join(sources), dict(defaults))


def apply_defaults(values: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """values with each default filled in where the request left it unset (None), as vLLM's to_sampling_params."""
    for name, value in defaults.items():
        if values.get(name) is None:
            values[name] = value
    return values


def check_generation_config_arg(value: str) -> str:
    """'auto', 'vllm' or an existing directory; a clear error at start-up otherwise."""
    if value not in ("auto", "vllm") and not Path(value).is_dir():
        raise ValueError(f"generation_config must be 'auto', 'vllm' or a directory holding a "
                         f"{GENERATION_CONFIG_FILE}; {value!r} is none of these")
    return value
