"""Making the grammar backends for one model: its tokenizer, vocabulary size and stop tokens."""

from __future__ import annotations

import functools
from typing import Callable

from freight.config import EngineConfig
from freight.structured_output.backend import Backend


def make_backend_factory(tokenizer_path: str, config: EngineConfig, vocab_size: int,
                         stop_token_ids: list[int]) -> Callable[[str], Backend]:
    """name ("xgrammar" | "guidance") -> a backend; the tokenizer is loaded once, on first use."""

    @functools.lru_cache(maxsize=1)
    def tokenizer():
        from freight.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer_path, config.revision, config.trust_remote_code)

    def make(name: str) -> Backend:
        if name == "xgrammar":
            from freight.structured_output.xgrammar_backend import XGrammarBackend

            return XGrammarBackend(tokenizer(), vocab_size, stop_token_ids)
        if name == "guidance":
            from freight.structured_output.guidance_backend import GuidanceBackend

            return GuidanceBackend(tokenizer(), vocab_size, stop_token_ids)
        raise ValueError(f"unknown structured outputs backend {name!r}")

    return make
