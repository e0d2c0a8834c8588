"""Hermes / Qwen2.5 tool calls: one block per call, as Qwen2.5's chat template teaches the model:

    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

Text before, between and after the blocks is content. A last block cut off before </tool_call> still counts."""

from __future__ import annotations

import enum

from freight.entrypoints.openai.tool_parsers.base import (
    JSON_WHITESPACE,
    MalformedToolCall,
    MarkerFinder,
    ToolParser,
    call_from_json_object,
    decode_json_at,
    skip_whitespace,
)


class _Mode(enum.Enum):
    TEXT = enum.auto()
    CALL = enum.auto()
    CLOSING = enum.auto()  # after the call's object, expecting </tool_call>


class HermesToolParser(ToolParser):
    name = "hermes"
    start_tag = "<tool_call>"
    end_tag = "</tool_call>"

    def __init__(self, tokenizer=None):
        super().__init__(tokenizer)
        self._mode = _Mode.TEXT
        self._start_finder = MarkerFinder(self.start_tag)
        self._end_tail = ""  # the part of </tool_call> seen so far

    def _parse(self, text: str) -> tuple[list[tuple[str, dict]], list[str]]:
        calls, content = [], []
        pos = 0
        while True:
            start = text.find(self.start_tag, pos)
            if start < 0:
                content.append(text[pos:])
                return calls, content
            content.append(text[pos:start])
            obj, pos = decode_json_at(text, start + len(self.start_tag))
            calls.append(call_from_json_object(obj))
            pos = skip_whitespace(text, pos)
            if text.startswith(self.end_tag, pos):
                pos += len(self.end_tag)
            elif pos < len(text):
                raise MalformedToolCall("text between a tool call and </tool_call>")

    def _consume(self, text: str) -> None:
        while text and not self._passthrough:
            if self._mode is _Mode.TEXT:
                before, marker, text = self._start_finder.find(text)
                self._emit_content(before)
                if marker:
                    self._start_json_call(marker)
                    self._mode = _Mode.CALL
            elif self._mode is _Mode.CALL:
                text, ended = self._feed_json_call(text)
                if ended:
                    self._mode = _Mode.CLOSING
            else:
                text = self._read_end_tag(text)

    def _read_end_tag(self, text: str) -> str:
        tail = (self._end_tail + text).lstrip(JSON_WHITESPACE)
        self._end_tail = ""
        if tail.startswith(self.end_tag):
            self._mode = _Mode.TEXT
            return tail[len(self.end_tag):]
        if self.end_tag.startswith(tail):
            self._end_tail = tail
        else:
            self._fail_call(tail)
        return ""

    def _finish(self) -> None:
        if self._mode is _Mode.TEXT:
            self._emit_content(self._start_finder.flush())
        elif self._mode is _Mode.CALL:
            self._give_back_unfinished_call()
        # CLOSING: a missing </tool_call> at the very end is accepted, as in _parse
