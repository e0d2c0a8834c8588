"""What every tool-call parser shares: the result type, call ids, argument rules, the streaming output buffer, and
two incremental scanners (a marker finder and a JSON call-object reader) that let the streaming parsers read each
character of the output once instead of re-parsing the accumulated text at every token."""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from freight.entrypoints.openai.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)

JSON_WHITESPACE = " \t\r\n"
# Llama's templates ask for "parameters"; everyone else writes "arguments".
ARGUMENT_KEYS = ("arguments", "parameters")

_JSON_DECODER = json.JSONDecoder()


class MalformedToolCall(ValueError):
    """Text that looked like a tool call does not parse as one."""


@dataclass
class ExtractedToolCalls:
    tools_called: bool
    tool_calls: list[ToolCall]
    content: Optional[str]  # text outside the tool calls (None when empty)


def make_tool_call_id() -> str:
    return "chatcmpl-tool-" + uuid.uuid4().hex


def arguments_json(arguments: dict) -> str:
    return json.dumps(arguments, ensure_ascii=False)


def normalize_arguments(value: Any) -> dict:
    """The arguments object of a call: a dict as is, null as {}, and a string that holds a JSON object decoded
    (some models write the arguments as a JSON string)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise MalformedToolCall("the arguments string is not JSON") from None
    if not isinstance(value, dict):
        raise MalformedToolCall("the arguments are not a JSON object")
    return value


def call_from_json_object(obj: Any) -> tuple[str, dict]:
    """(name, arguments) of a decoded {"name": ..., "arguments": {...}} object."""
    if not isinstance(obj, dict):
        raise MalformedToolCall("a tool call is not a JSON object")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise MalformedToolCall("a tool call has no name")
    key = next((k for k in obj if k in ARGUMENT_KEYS), None)
    if key is None:
        raise MalformedToolCall("a tool call has no arguments")
    return name, normalize_arguments(obj[key])


def skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in JSON_WHITESPACE:
        pos += 1
    return pos


def decode_json_at(text: str, pos: int) -> tuple[Any, int]:
    """The JSON value starting at text[pos] (after whitespace) and the index just past it."""
    try:
        return _JSON_DECODER.raw_decode(text, skip_whitespace(text, pos))
    except json.JSONDecodeError as e:
        raise MalformedToolCall(str(e)) from None


def held_back_length(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of text that is the start of a marker (so it may still become one)."""
    longest = 0
    for marker in markers:
        for k in range(min(len(text), len(marker) - 1), longest, -1):
            if text.endswith(marker[:k]):
                longest = k
                break
    return longest


class MarkerFinder:
    """Finds the first of some markers in streamed text. A tail that may be the start of a marker is held back
    until the next piece decides it, so each call scans only the new text plus that short tail."""

    def __init__(self, *markers: str):
        self.markers = markers
        self.held = ""

    def find(self, text: str) -> tuple[str, Optional[str], str]:
        """(text before the marker, the marker, text after it); (safe text, None, "") when there is none yet."""
        text = self.held + text
        self.held = ""
        hits = [(text.find(m), m) for m in self.markers if m in text]
        if hits:
            index, marker = min(hits)
            return text[:index], marker, text[index + len(marker):]
        keep = held_back_length(text, self.markers)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], None, ""

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


_SCALAR_END = frozenset(JSON_WHITESPACE + ",}]")
_VALUE_START = frozenset('{["-0123456789tfn')


class JsonValueTracker:
    """Follows one JSON value as it streams in, to know where it ends. It does not validate the value."""

    def __init__(self):
        self.done = False
        self._started = False
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._scalar = False

    def feed(self, text: str, start: int = 0) -> int:
        """Reads text from start; returns the index just past the value, or len(text) while it goes on.
        A number or literal ends at the delimiter after it, which is left unread."""
        i, n = start, len(text)
        if not self._started and i < n:
            self._started = True
            first = text[i]
            if first in "{[":
                self._depth = 1
            elif first == '"':
                self._in_string = True
            else:
                self._scalar = True
            i += 1
        while i < n:
            ch = text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
                    if self._depth == 0:
                        self.done = True
                        return i + 1
            elif self._scalar:
                if ch in _SCALAR_END:
                    self.done = True
                    return i
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return i + 1
            i += 1
        return n


class _Expect(enum.Enum):
    OPEN = enum.auto()
    KEY_OR_END = enum.auto()
    COLON = enum.auto()
    VALUE = enum.auto()
    AFTER_VALUE = enum.auto()


class _Role(enum.Enum):
    KEY = enum.auto()
    NAME = enum.auto()
    ARGUMENTS = enum.auto()           # an object: streamed out as raw text
    ARGUMENTS_TO_DECODE = enum.auto()  # a string or null: decoded when complete
    SKIPPED = enum.auto()


class JsonCallScanner:
    """Reads one {"name": ..., "arguments": {...}} object as it streams in, each character once: the name when it
    is complete, the arguments object as raw JSON text pieces (take_arguments). It stops right after the closing
    brace (done) or at the first character that cannot belong to such an object (failed)."""

    def __init__(self):
        self.name: Optional[str] = None
        self.arguments_started = False
        self.done = False
        self.failed = False
        self._expect = _Expect.OPEN
        self._key: Optional[str] = None
        self._token: Optional[JsonValueTracker] = None  # the key or value being read
        self._role = _Role.SKIPPED
        self._token_text = ""
        self._arguments = ""  # argument text not taken yet

    def take_arguments(self) -> str:
        pending, self._arguments = self._arguments, ""
        return pending

    def feed(self, text: str) -> int:
        """Reads text; returns how many characters belong to the object (all of them while it goes on)."""
        i = 0
        while i < len(text) and not (self.done or self.failed):
            if self._token is not None:
                end = self._token.feed(text, i)
                if self._role is _Role.ARGUMENTS:
                    self._arguments += text[i:end]
                elif self._role is not _Role.SKIPPED:
                    self._token_text += text[i:end]
                i = end
                if self._token.done:
                    self._close_token()
                continue
            ch = text[i]
            if ch in JSON_WHITESPACE:
                pass
            elif self._expect is _Expect.OPEN and ch == "{":
                self._expect = _Expect.KEY_OR_END
            elif self._expect is _Expect.KEY_OR_END and ch == '"':
                self._open_token(_Role.KEY)
                continue  # the tracker reads the quote
            elif self._expect in (_Expect.KEY_OR_END, _Expect.AFTER_VALUE) and ch == "}":
                self.done = self.name is not None and self.arguments_started
                self.failed = not self.done
            elif self._expect is _Expect.AFTER_VALUE and ch == ",":
                self._expect = _Expect.KEY_OR_END
            elif self._expect is _Expect.COLON and ch == ":":
                self._expect = _Expect.VALUE
            elif self._expect is _Expect.VALUE and ch in _VALUE_START:
                self._open_token(self._value_role(ch))
                continue
            else:
                self.failed = True
                break
            i += 1
        return i

    def _value_role(self, first_char: str) -> _Role:
        if self._key == "name" and self.name is None:
            return _Role.NAME
        if self._key in ARGUMENT_KEYS and not self.arguments_started:
            self.arguments_started = True
            return _Role.ARGUMENTS if first_char == "{" else _Role.ARGUMENTS_TO_DECODE
        return _Role.SKIPPED

    def _open_token(self, role: _Role) -> None:
        self._token = JsonValueTracker()
        self._role = role
        self._token_text = ""

    def _close_token(self) -> None:
        role, raw = self._role, self._token_text
        self._token = None
        self._expect = _Expect.AFTER_VALUE
        try:
            if role is _Role.KEY:
                self._key = json.loads(raw)
                self._expect = _Expect.COLON
            elif role is _Role.NAME:
                name = json.loads(raw)
                if not isinstance(name, str) or not name:
                    raise MalformedToolCall("a tool call has no name")
                self.name = name
            elif role is _Role.ARGUMENTS_TO_DECODE:
                self._arguments = arguments_json(normalize_arguments(json.loads(raw)))
        except ValueError:  # MalformedToolCall included
            self.failed = True


class ToolParser:
    """Extracts tool calls from a model's output, whole (extract_tool_calls) or as it streams
    (extract_tool_calls_streaming, then finish_streaming; one instance per streamed choice).

    Subclasses implement _parse (whole text) and _consume/_finish (streaming), using the helpers below."""

    name: ClassVar[str]
    # True when the parser needs special tokens kept in the detokenized text (e.g. mistral's [TOOL_CALLS] is a
    # special token that skip_special_tokens would strip); the server then sets skip_special_tokens=False.
    keeps_special_tokens: ClassVar[bool] = False

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer  # unused by the text-based parsers; kept for parsers that need token ids
        self._content_out: list[str] = []
        self._calls_out: list[DeltaToolCall] = []
        self._content_started = False
        self._leading_whitespace = ""  # whitespace-only content is held: alone it is no content at all
        self._calls_sent = 0
        self._header_sent = False      # for the call being read now
        self._call_text = ""           # its raw text while no part of it went out, given back if it fails
        self._json_call: Optional[JsonCallScanner] = None
        self._passthrough = False      # a call failed to parse: the rest of the output is content

    @classmethod
    def new_call_id(cls) -> str:
        return make_tool_call_id()

    @property
    def streamed_tool_calls(self) -> bool:
        return self._calls_sent > 0

    # -- whole output ---------------------------------------------------------------------------------------------
    def extract_tool_calls(self, model_output: str) -> ExtractedToolCalls:
        try:
            calls, content_pieces = self._parse(model_output)
        except MalformedToolCall:
            calls = []
        if not calls:
            return ExtractedToolCalls(tools_called=False, tool_calls=[], content=model_output or None)
        tool_calls = [ToolCall(id=self.new_call_id(), function=FunctionCall(name=name, arguments=arguments_json(args)))
                      for name, args in calls]
        content = "".join(content_pieces)
        return ExtractedToolCalls(tools_called=True, tool_calls=tool_calls,
                                  content=content if content.strip() else None)

    def _parse(self, text: str) -> tuple[list[tuple[str, dict]], list[str]]:
        """(name, arguments) of each call and the pieces of text outside them; raises MalformedToolCall."""
        raise NotImplementedError

    # -- streaming ------------------------------------------------------------------------------------------------
    def extract_tool_calls_streaming(self, delta_text: str) -> Optional[DeltaMessage]:
        if self._passthrough:
            self._emit_content(delta_text)
        else:
            self._consume(delta_text)
        return self._take_delta()

    def finish_streaming(self) -> Optional[DeltaMessage]:
        if not self._passthrough:
            self._finish()
        if self._leading_whitespace and not self._calls_sent:
            self._content_out.append(self._leading_whitespace)
        self._leading_whitespace = ""
        return self._take_delta()

    def _consume(self, text: str) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Flush held-back text at the end of the stream."""
        raise NotImplementedError

    # -- helpers for the streaming state machines ------------------------------------------------------------------
    def _emit_content(self, text: str) -> None:
        if not text:
            return
        if not self._content_started:
            if not text.strip():
                self._leading_whitespace += text
                return
            text, self._leading_whitespace = self._leading_whitespace + text, ""
            self._content_started = True
        self._content_out.append(text)

    def _begin_call(self, raw_text: str = "") -> None:
        self._call_text = raw_text
        self._header_sent = False

    def _record(self, raw_text: str) -> None:
        if not self._header_sent:
            self._call_text += raw_text

    def _send_header(self, name: str) -> None:
        self._calls_out.append(DeltaToolCall(index=self._calls_sent, id=self.new_call_id(), type="function",
                                             function=DeltaFunctionCall(name=name)))
        self._calls_sent += 1
        self._header_sent = True
        self._call_text = ""

    def _send_arguments(self, piece: str) -> None:
        if not piece:
            return
        index = self._calls_sent - 1
        last = self._calls_out[-1] if self._calls_out else None
        if last is not None and last.index == index and last.id is None:
            last.function.arguments += piece  # one fragment per call per delta
        else:
            self._calls_out.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=piece)))

    def _end_call(self) -> None:
        self._call_text = ""
        self._header_sent = False
        self._json_call = None

    def _fail_call(self, rest: str) -> None:
        """The call being read does not parse: what of it did not go out, and all that follows, is content."""
        if not self._header_sent:
            self._emit_content(self._call_text)
        self._end_call()
        self._emit_content(rest)
        self._passthrough = True

    def _give_back_unfinished_call(self) -> None:
        """At the end of the stream: a call cut off before its name went out is returned as content."""
        if not self._header_sent:
            self._emit_content(self._call_text)
        self._end_call()

    def _start_json_call(self, raw_text: str = "") -> None:
        self._begin_call(raw_text)
        self._json_call = JsonCallScanner()

    def _feed_json_call(self, text: str) -> tuple[str, bool]:
        """Feeds the current JSON call object; returns (text after it, whether it ended). The header goes out once
        the name is complete and the arguments have begun (so a plain JSON object with a "name" is not a call)."""
        scanner = self._json_call
        used = scanner.feed(text)
        self._record(text[:used])
        if not self._header_sent and scanner.name is not None and scanner.arguments_started:
            self._send_header(scanner.name)
        if self._header_sent:
            self._send_arguments(scanner.take_arguments())
        if scanner.failed:
            self._fail_call(text[used:])
            return "", False
        if scanner.done:
            self._end_call()
            return text[used:], True
        return "", False

    def _take_delta(self) -> Optional[DeltaMessage]:
        content = "".join(self._content_out) or None
        calls = self._calls_out
        self._content_out, self._calls_out = [], []
        if content is None and not calls:
            return None
        return DeltaMessage(content=content, tool_calls=calls)
