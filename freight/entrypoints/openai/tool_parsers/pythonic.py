"""Pythonic tool calls (Llama 3.2 / 4 style): a Python list of calls with literal keyword arguments,

    [get_weather(city='Paris', days=3), get_time()]

read with `ast` (literals only: str, int, float, bool, None, list, tuple, dict). A list counts as tool calls when
it starts the output or follows whitespace and opens with `name(`; other text, before or after, is content.
Streaming emits each call whole (arguments as JSON) once its closing parenthesis arrives."""

from __future__ import annotations

import ast
import enum
import json
import re
from typing import Optional

from freight.entrypoints.openai.tool_parsers.base import MalformedToolCall, ToolParser, arguments_json

# "[", optional whitespace, a function name, whitespace: followed by "(" it opens a list of calls.
_LIST_OPENING = re.compile(r"\[\s*([A-Za-z_]\w*)?\s*")
_WHITESPACE = " \t\r\n"


def _opens_call_list(text: str, pos: int) -> Optional[bool]:
    """Whether the "[" at text[pos] opens a list of calls; None while the text so far cannot tell."""
    match = _LIST_OPENING.match(text, pos)
    if match.end() == len(text):
        return None
    return bool(match.group(1)) and text[match.end()] == "("


def _may_open_list(text: str, pos: int, char_before: Optional[str]) -> bool:
    before = text[pos - 1] if pos > 0 else char_before
    return before is None or before.isspace()


class PythonExpressionEnd:
    """Finds where a bracketed Python expression, `f(...)` or `[...]`, ends, minding strings and nesting.
    Before the first bracket only a name and whitespace may come; anything else fails."""

    def __init__(self):
        self.done = False
        self.failed = False
        self._depth = 0
        self._quote: Optional[str] = None
        self._escaped = False

    def feed(self, text: str, start: int = 0) -> int:
        """Reads text from start; returns the index just past the expression, or where it failed."""
        for i in range(start, len(text)):
            ch = text[i]
            if self._quote:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == self._quote:
                    self._quote = None
            elif self._depth == 0 and ch not in "([{" and not (ch.isalnum() or ch == "_" or ch.isspace()):
                self.failed = True
                return i
            elif ch in "\"'":
                self._quote = ch
            elif ch in "([{":
                self._depth += 1
            elif ch in ")]}":
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


def _parse_expression(source: str) -> ast.expr:
    try:
        return ast.parse(source.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise MalformedToolCall("not a Python expression") from None


def call_from_python(node: ast.expr) -> tuple[str, dict]:
    """(name, arguments) of `name(key=literal, ...)`."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        raise MalformedToolCall("not a call with keyword arguments")
    arguments = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise MalformedToolCall("**kwargs in a tool call")
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            raise MalformedToolCall(f"argument {keyword.arg!r} is not a literal") from None
    try:
        json.dumps(arguments)
    except (TypeError, ValueError):  # sets, bytes, complex numbers, tuple keys
        raise MalformedToolCall("arguments that JSON cannot hold") from None
    return node.func.id, arguments


class _Mode(enum.Enum):
    TEXT = enum.auto()
    ITEM = enum.auto()        # inside the list, expecting a call (or "]" after a trailing comma)
    CALL = enum.auto()
    AFTER_ITEM = enum.auto()  # "," or "]"


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def __init__(self, tokenizer=None):
        super().__init__(tokenizer)
        self._mode = _Mode.TEXT
        self._held = ""                          # a "[" that may open a list of calls, and what follows it
        self._char_before: Optional[str] = None  # the last character before the held text (None: output start)
        self._call_end: Optional[PythonExpressionEnd] = None
        self._call_source = ""

    def _parse(self, text: str) -> tuple[list[tuple[str, dict]], list[str]]:
        calls, content = [], []
        pos = search = 0
        while True:
            start = text.find("[", search)
            if start < 0:
                content.append(text[pos:])
                return calls, content
            search = start + 1
            if not (_may_open_list(text, start, None) and _opens_call_list(text, start)):
                continue
            list_end = PythonExpressionEnd()
            end = list_end.feed(text, start)
            if not list_end.done:
                raise MalformedToolCall("an unfinished list of calls")
            node = _parse_expression(text[start:end])
            if not isinstance(node, ast.List):
                raise MalformedToolCall("not a list of calls")
            calls.extend(call_from_python(item) for item in node.elts)
            content.append(text[pos:start])
            pos = search = end

    def _consume(self, text: str) -> None:
        while text and not self._passthrough:
            if self._mode is _Mode.TEXT:
                text = self._read_text(text)
            elif self._mode in (_Mode.ITEM, _Mode.AFTER_ITEM):
                text = self._read_structure(text)
            else:
                text = self._read_call(text)

    def _emit_text(self, text: str) -> None:
        if text:
            self._emit_content(text)
            self._char_before = text[-1]

    def _read_text(self, text: str) -> str:
        text, self._held = self._held + text, ""
        pos = 0
        while True:
            start = text.find("[", pos)
            if start < 0:
                self._emit_text(text)
                return ""
            opens = _may_open_list(text, start, self._char_before) and _opens_call_list(text, start)
            if opens is None:
                self._emit_text(text[:start])
                self._held = text[start:]
                return ""
            if opens:
                self._emit_text(text[:start])
                self._begin_call("[")
                self._mode = _Mode.ITEM
                return text[start + 1:]
            pos = start + 1

    def _read_structure(self, text: str) -> str:
        stripped = text.lstrip(_WHITESPACE)
        self._record(text[:len(text) - len(stripped)])
        if not stripped:
            return ""
        ch = stripped[0]
        if ch == "]":
            self._end_call()
            self._char_before = "]"
            self._mode = _Mode.TEXT
        elif self._mode is _Mode.AFTER_ITEM and ch == ",":
            self._record(ch)
            self._mode = _Mode.ITEM
        elif self._mode is _Mode.ITEM and (ch.isalpha() or ch == "_"):
            self._call_end = PythonExpressionEnd()
            self._call_source = ""
            self._mode = _Mode.CALL
            return stripped
        else:
            self._fail_call(stripped)
            return ""
        return stripped[1:]

    def _read_call(self, text: str) -> str:
        end = self._call_end.feed(text)
        self._record(text[:end])
        self._call_source += text[:end]
        if self._call_end.failed:
            self._fail_call(text[end:])
            return ""
        if not self._call_end.done:
            return ""
        try:
            name, arguments = call_from_python(_parse_expression(self._call_source))
        except MalformedToolCall:
            self._fail_call(text[end:])
            return ""
        self._send_header(name)
        self._send_arguments(arguments_json(arguments))
        self._end_call()
        self._mode = _Mode.AFTER_ITEM
        return text[end:]

    def _finish(self) -> None:
        if self._mode is _Mode.TEXT:
            self._emit_text(self._held)
            self._held = ""
        else:
            self._give_back_unfinished_call()
