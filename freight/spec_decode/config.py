"""SpeculativeConfig: vLLM's --speculative-config, for the method freight implements (n-gram prompt lookup)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

# When the user does not set disable_by_batch_size: above this many requests in the engine, verification
# costs more than speculation saves (measured with `freight bench spec-decode`, docs/performance.md).
DEFAULT_DISABLE_BY_BATCH_SIZE = 4


@dataclass
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 0
    prompt_lookup_max: Optional[int] = None
    prompt_lookup_min: Optional[int] = None
    # vLLM's name: no drafts while more than this many requests are running or waiting.
    disable_by_batch_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.method in ("[ngram]",):
            self.method = "ngram"
        if self.method != "ngram":
            raise ValueError(f"speculative method {self.method!r} is not supported; freight implements "
                             "'ngram' (prompt lookup, no draft model)")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be a positive integer, got {self.num_speculative_tokens!r}")
        # vLLM's defaults: both unset -> 5 and 5; one set -> the other takes its value.
        if self.prompt_lookup_min is None and self.prompt_lookup_max is None:
            self.prompt_lookup_min = self.prompt_lookup_max = 5
        elif self.prompt_lookup_min is None:
            self.prompt_lookup_min = self.prompt_lookup_max
        elif self.prompt_lookup_max is None:
            self.prompt_lookup_max = self.prompt_lookup_min
        if self.prompt_lookup_min < 1:
            raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} must be > 0")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} must be <= "
                             f"prompt_lookup_max={self.prompt_lookup_max}")
        if self.disable_by_batch_size is None:
            self.disable_by_batch_size = DEFAULT_DISABLE_BY_BATCH_SIZE
        elif self.disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be at least 1, got {self.disable_by_batch_size}")

    @classmethod
    def parse(cls, value: Union[None, str, dict, "SpeculativeConfig"]) -> Optional["SpeculativeConfig"]:
        """From a JSON string (the CLI), a dict (LLM(speculative_config=...)) or None (no speculation)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"--speculative-config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {value!r}")
        value = dict(value)
        if value.get("model") in ("ngram", "[ngram]") and "method" not in value:
            value["method"] = "ngram"  # vLLM's older spelling
        if value.get("model") not in (None, "ngram", "[ngram]"):
            raise ValueError("speculative_config: draft models are not supported; use {\"method\": \"ngram\", ...}")
        value.pop("model", None)
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
