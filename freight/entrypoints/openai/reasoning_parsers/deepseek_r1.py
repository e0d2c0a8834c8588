"""DeepSeek-R1: its template opens <think> in the prompt (newer revisions let the model write it), so everything
up to </think> is reasoning, a leading <think> is dropped, and an output without </think> is all reasoning."""

from __future__ import annotations

from freight.entrypoints.openai.reasoning_parsers.base import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
