"""Llama 3.1 / 3.2 JSON tool calls: {"name": ..., "parameters": {...}} ("arguments" accepted too), several
separated by ";". The calls either open the output (after whitespace) or follow a <|python_tag|> (kept in the text
only when special tokens are not skipped). Whitespace after the last call is dropped; other text there is content."""

from __future__ import annotations

import enum

from freight.entrypoints.openai.tool_parsers.base import (
    JSON_WHITESPACE,
    MarkerFinder,
    ToolParser,
    call_from_json_object,
    decode_json_at,
    skip_whitespace,
)


class _Mode(enum.Enum):
    START = enum.auto()       # nothing but whitespace so far: a "{" here opens a call
    TEXT = enum.auto()
    CALL = enum.auto()
    AFTER_CALL = enum.auto()  # ";" opens another call


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    python_tag = "<|python_tag|>"
    separator = ";"

    def __init__(self, tokenizer=None):
        super().__init__(tokenizer)
        self._mode = _Mode.START
        self._tag_finder = MarkerFinder(self.python_tag)

    def _parse(self, text: str) -> tuple[list[tuple[str, dict]], list[str]]:
        calls, content = [], []
        pos = skip_whitespace(text, 0)
        in_calls = text.startswith("{", pos)
        if in_calls:
            content.append(text[:pos])
        else:
            pos = 0
        while True:
            if not in_calls:
                tag = text.find(self.python_tag, pos)
                if tag < 0:
                    content.append(text[pos:])
                    return calls, content
                content.append(text[pos:tag])
                pos = tag + len(self.python_tag)
            obj, pos = decode_json_at(text, pos)
            calls.append(call_from_json_object(obj))
            pos = skip_whitespace(text, pos)
            in_calls = text.startswith(self.separator, pos)
            if in_calls:
                pos += len(self.separator)

    def _consume(self, text: str) -> None:
        while text and not self._passthrough:
            if self._mode is _Mode.START:
                stripped = text.lstrip(JSON_WHITESPACE)
                self._emit_content(text[:len(text) - len(stripped)])
                text = stripped
                if text:
                    self._mode = _Mode.TEXT
                    if text[0] == "{":
                        self._start_json_call()
                        self._mode = _Mode.CALL
            elif self._mode is _Mode.TEXT:
                before, marker, text = self._tag_finder.find(text)
                self._emit_content(before)
                if marker:
                    self._start_json_call(marker)
                    self._mode = _Mode.CALL
            elif self._mode is _Mode.CALL:
                text, ended = self._feed_json_call(text)
                if ended:
                    self._mode = _Mode.AFTER_CALL
            else:
                text = text.lstrip(JSON_WHITESPACE)
                if text.startswith(self.separator):
                    self._start_json_call(self.separator)
                    self._mode = _Mode.CALL
                    text = text[len(self.separator):]
                elif text:
                    self._mode = _Mode.TEXT

    def _finish(self) -> None:
        if self._mode is _Mode.TEXT:
            self._emit_content(self._tag_finder.flush())
        elif self._mode is _Mode.CALL:
            self._give_back_unfinished_call()
