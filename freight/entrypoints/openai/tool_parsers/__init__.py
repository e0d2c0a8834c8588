"""Tool-call parsers for `--enable-auto-tool-choice --tool-call-parser NAME`, by name."""

from __future__ import annotations

from freight.entrypoints.openai.tool_parsers.base import ExtractedToolCalls, ToolParser
from freight.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from freight.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from freight.entrypoints.openai.tool_parsers.mistral import MistralToolParser
from freight.entrypoints.openai.tool_parsers.pythonic import PythonicToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser
    for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)
}


def get_tool_parser(name: str) -> type[ToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        valid = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"unknown tool call parser {name!r}; valid names: {valid}") from None


__all__ = ["TOOL_PARSERS", "ExtractedToolCalls", "ToolParser", "get_tool_parser", "HermesToolParser",
           "Llama3JsonToolParser", "MistralToolParser", "PythonicToolParser"]
