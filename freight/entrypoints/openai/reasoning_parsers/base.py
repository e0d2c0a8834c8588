"""Splits a reasoning model's output into reasoning_content (inside <think>...</think>) and content, whole or as
it streams. The chat template often opens the think block in the prompt, so the output may begin inside it
without a <think>: prompt_opens_reasoning says whether to assume that."""

from __future__ import annotations

import enum
from typing import ClassVar, Optional

from freight.entrypoints.openai.protocol import DeltaMessage
from freight.entrypoints.openai.tool_parsers.base import MarkerFinder


class _Phase(enum.Enum):
    OPENING = enum.auto()    # only whitespace or the start of <think> so far
    REASONING = enum.auto()
    CONTENT = enum.auto()


def _message(reasoning: str, content: str) -> Optional[DeltaMessage]:
    if not reasoning and not content:
        return None
    return DeltaMessage(reasoning_content=reasoning or None, content=content or None)


class ReasoningParser:
    """One instance per streamed choice: extract_reasoning_streaming with each delta, then finish_streaming."""

    name: ClassVar[str]
    start_tag: ClassVar[str] = "<think>"
    end_tag: ClassVar[str] = "</think>"

    def __init__(self, tokenizer=None, *, chat_template_kwargs: Optional[dict] = None):
        self.tokenizer = tokenizer  # unused: the tags are matched in text
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._phase = _Phase.OPENING
        self._opening = ""
        self._end_finder = MarkerFinder(self.end_tag)

    def prompt_opens_reasoning(self) -> bool:
        """Whether output that does not start with <think> is still reasoning until </think>."""
        return True

    def _after_start_tag(self, text: str) -> Optional[str]:
        """The text after a leading <think> (whitespace before it dropped), or None if it does not start so."""
        stripped = text.lstrip()
        return stripped[len(self.start_tag):] if stripped.startswith(self.start_tag) else None

    def extract_reasoning(self, model_output: str) -> tuple[Optional[str], Optional[str]]:
        """(reasoning_content, content). Without </think> all of a reasoning output is reasoning (cut off)."""
        body = self._after_start_tag(model_output)
        if body is None:
            if not self.prompt_opens_reasoning():
                return None, model_output or None
            body = model_output
        reasoning, _, content = body.partition(self.end_tag)
        return reasoning or None, content or None

    def is_reasoning_end(self) -> bool:
        """True once the stream is past the reasoning (so later text can go to a tool parser)."""
        return self._phase is _Phase.CONTENT

    def extract_reasoning_streaming(self, delta_text: str) -> Optional[DeltaMessage]:
        return _message(*self._route(delta_text))

    def finish_streaming(self) -> Optional[DeltaMessage]:
        text, self._opening = self._opening, ""
        if self._phase is _Phase.OPENING:
            self._phase = self._phase_without_start_tag()
        reasoning, content = self._route(text)
        if self._phase is _Phase.REASONING:
            reasoning += self._end_finder.flush()
        return _message(reasoning, content)

    def _phase_without_start_tag(self) -> _Phase:
        return _Phase.REASONING if self.prompt_opens_reasoning() else _Phase.CONTENT

    def _route(self, text: str) -> tuple[str, str]:
        """(reasoning, content) of the next piece of text."""
        reasoning = ""
        if self._phase is _Phase.OPENING:
            text = self._read_opening(text)
        if self._phase is _Phase.REASONING and text:
            reasoning, tag, text = self._end_finder.find(text)
            if tag:
                self._phase = _Phase.CONTENT
        return reasoning, text if self._phase is _Phase.CONTENT else ""

    def _read_opening(self, text: str) -> str:
        opening = self._opening + text
        self._opening = ""
        body = self._after_start_tag(opening)
        if body is not None:
            self._phase = _Phase.REASONING
            return body
        if self.start_tag.startswith(opening.lstrip()):  # whitespace, or part of <think>: wait
            self._opening = opening
            return ""
        self._phase = self._phase_without_start_tag()
        return opening
