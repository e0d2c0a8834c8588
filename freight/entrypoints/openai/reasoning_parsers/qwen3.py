"""Qwen3: as DeepSeek-R1 (text before </think> is reasoning, with or without a leading <think>), except that with
chat_template_kwargs enable_thinking=False the template puts an empty "<think>\n\n</think>\n\n" in the prompt, so
the output is content unless it opens a think block itself."""

from __future__ import annotations

from freight.entrypoints.openai.reasoning_parsers.base import ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"

    def prompt_opens_reasoning(self) -> bool:
        return bool(self.chat_template_kwargs.get("enable_thinking", True))
