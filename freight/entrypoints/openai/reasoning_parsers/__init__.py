"""Reasoning parsers for `--reasoning-parser NAME`, by name."""

from __future__ import annotations

from freight.entrypoints.openai.reasoning_parsers.base import ReasoningParser
from freight.entrypoints.openai.reasoning_parsers.deepseek_r1 import DeepSeekR1ReasoningParser
from freight.entrypoints.openai.reasoning_parsers.qwen3 import Qwen3ReasoningParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    parser.name: parser for parser in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        valid = ", ".join(sorted(REASONING_PARSERS))
        raise ValueError(f"unknown reasoning parser {name!r}; valid names: {valid}") from None


__all__ = ["REASONING_PARSERS", "ReasoningParser", "get_reasoning_parser", "DeepSeekR1ReasoningParser",
           "Qwen3ReasoningParser"]
