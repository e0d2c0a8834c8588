"""Mistral tool calls, after the [TOOL_CALLS] special token, in either of Mistral's two formats:

    [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]          tokenizers before v11
    [TOOL_CALLS]f[ARGS]{...}[TOOL_CALLS]g[ARGS]{...}              v11 and later ([ARGS] may be absent from the text)

Text before and after is content. Mistral requires tool call ids of 9 alphanumeric characters."""

from __future__ import annotations

import enum
import re
import secrets
import string
from typing import Optional

from freight.entrypoints.openai.tool_parsers.base import (
    JSON_WHITESPACE,
    JsonCallScanner,
    JsonValueTracker,
    MalformedToolCall,
    MarkerFinder,
    ToolParser,
    call_from_json_object,
    decode_json_at,
    skip_whitespace,
)

_ID_ALPHABET = string.ascii_letters + string.digits
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# A name longer than this (raw, with [ARGS] and whitespace) cannot become valid: give up instead of buffering.
_MAX_RAW_NAME = 256


class _Mode(enum.Enum):
    TEXT = enum.auto()
    AFTER_MARKER = enum.auto()  # "[" starts the array form, anything else a name
    ARRAY_ITEM = enum.auto()
    ARRAY_CALL = enum.auto()
    AFTER_ITEM = enum.auto()    # "," or "]"
    NAME = enum.auto()
    ARGUMENTS = enum.auto()


class MistralToolParser(ToolParser):
    name = "mistral"
    keeps_special_tokens = True
    marker = "[TOOL_CALLS]"
    args_marker = "[ARGS]"

    def __init__(self, tokenizer=None):
        super().__init__(tokenizer)
        self._mode = _Mode.TEXT
        self._marker_finder = MarkerFinder(self.marker)
        self._raw_name = ""
        self._arguments: Optional[JsonValueTracker] = None

    @classmethod
    def new_call_id(cls) -> str:
        return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))

    def _function_name(self, raw: str) -> str:
        name = raw.replace(self.args_marker, "").strip()
        if not _FUNCTION_NAME.fullmatch(name):
            raise MalformedToolCall(f"not a function name: {name!r}")
        return name

    def _parse(self, text: str) -> tuple[list[tuple[str, dict]], list[str]]:
        calls, content = [], []
        pos = 0
        while True:
            found = text.find(self.marker, pos)
            if found < 0:
                content.append(text[pos:])
                return calls, content
            content.append(text[pos:found])
            pos = skip_whitespace(text, found + len(self.marker))
            if text.startswith("[", pos):
                items, pos = decode_json_at(text, pos)
                if not items:
                    raise MalformedToolCall("an empty list of tool calls")
                calls.extend(call_from_json_object(item) for item in items)
            else:
                brace = text.find("{", pos)
                if brace < 0:
                    raise MalformedToolCall("a tool call without arguments")
                name = self._function_name(text[pos:brace])
                arguments, pos = decode_json_at(text, brace)
                calls.append((name, arguments))

    def _consume(self, text: str) -> None:
        while text and not self._passthrough:
            mode = self._mode
            if mode is _Mode.TEXT:
                before, marker, text = self._marker_finder.find(text)
                self._emit_content(before)
                if marker:
                    self._begin_call(marker)
                    self._mode = _Mode.AFTER_MARKER
            elif mode in (_Mode.AFTER_MARKER, _Mode.ARRAY_ITEM, _Mode.AFTER_ITEM):
                text = self._read_structure(text)
            elif mode is _Mode.ARRAY_CALL:
                text, ended = self._feed_json_call(text)
                if ended:
                    self._mode = _Mode.AFTER_ITEM
            elif mode is _Mode.NAME:
                text = self._read_name(text)
            else:
                end = self._arguments.feed(text)
                self._send_arguments(text[:end])
                text = text[end:]
                if self._arguments.done:
                    self._end_call()
                    self._mode = _Mode.TEXT

    def _read_structure(self, text: str) -> str:
        """The punctuation around calls: whitespace, then one character that decides what comes next."""
        stripped = text.lstrip(JSON_WHITESPACE)
        self._record(text[:len(text) - len(stripped)])
        if not stripped:
            return ""
        ch, mode = stripped[0], self._mode
        if mode is _Mode.AFTER_MARKER and ch != "[":
            self._raw_name = ""
            self._mode = _Mode.NAME
            return stripped
        if mode is _Mode.AFTER_MARKER or (mode is _Mode.AFTER_ITEM and ch == ","):
            self._record(ch)
            self._mode = _Mode.ARRAY_ITEM
        elif mode is _Mode.ARRAY_ITEM and ch == "{":
            self._json_call = JsonCallScanner()
            self._mode = _Mode.ARRAY_CALL
            return stripped
        elif mode is _Mode.AFTER_ITEM and ch == "]":
            self._mode = _Mode.TEXT
        else:
            self._fail_call(stripped)
            return ""
        return stripped[1:]

    def _read_name(self, text: str) -> str:
        brace = text.find("{")
        head = text if brace < 0 else text[:brace]
        self._raw_name += head
        self._record(head)
        if brace < 0:
            if len(self._raw_name) > _MAX_RAW_NAME:
                self._fail_call("")
            return ""
        try:
            name = self._function_name(self._raw_name)
        except MalformedToolCall:
            self._fail_call(text[brace:])
            return ""
        self._send_header(name)
        self._arguments = JsonValueTracker()
        self._mode = _Mode.ARGUMENTS
        return text[brace:]

    def _finish(self) -> None:
        if self._mode is _Mode.TEXT:
            self._emit_content(self._marker_finder.flush())
        else:
            self._give_back_unfinished_call()

