"""Tool-call parsers: whole-output results, and streaming that, split anywhere, adds up to the same thing."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Optional

import pytest

from freight.entrypoints.openai.protocol import DeltaMessage
from freight.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    PythonicToolParser,
    ToolParser,
    get_tool_parser,
)

WEATHER_ARGS = {"city": "Paris", "days": 3}
TRICKY_ARGS = {"q": 'a } " { ] [ \\ </tool_call>', "nested": {"x": [1, {"y": None}], "z": -2.5e3},
               "ok": True, "text": "Zürich ☀️"}

# (text, [(name, arguments)], content) for well-formed outputs.
VALID = {
    HermesToolParser: [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
         [("get_weather", WEATHER_ARGS)], None),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
         [("get_weather", WEATHER_ARGS), ("get_time", {})], None),
        ('Let me check.\n<tool_call>\n{"name": "search", "arguments": ' + json.dumps(TRICKY_ARGS) + '}\n</tool_call>',
         [("search", TRICKY_ARGS)], "Let me check.\n"),
        ('<tool_call>{"arguments": {"a": [1, 2]}, "extra": {"k": "}"}, "name": "f"}</tool_call> and more text',
         [("f", {"a": [1, 2]})], " and more text"),
        ('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', [("f", {"a": 1})], None),
        ('<tool_call>\n{"name": "f", "parameters": null}', [("f", {})], None),
        ("2 < 3 and <tool_c is not a tag; <tool_call", [], "2 < 3 and <tool_c is not a tag; <tool_call"),
        ("   ", [], "   "),
    ],
    Llama3JsonToolParser: [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', [("get_weather", WEATHER_ARGS)], None),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}; '
         '{"name": "search", "arguments": ' + json.dumps(TRICKY_ARGS, ensure_ascii=False) + '}',
         [("get_weather", WEATHER_ARGS), ("search", TRICKY_ARGS)], None),
        ('Sure, calling it.<|python_tag|>{"name": "f", "parameters": {}}', [("f", {})], "Sure, calling it."),
        ('\n {"name": "f", "parameters": {"a": "b"}} Done.', [("f", {"a": "b"})], "\n Done."),
        ('The set {1, 2} is small.', [], 'The set {1, 2} is small.'),
        ('ends with a partial tag <|python', [], 'ends with a partial tag <|python'),
    ],
    MistralToolParser: [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]',
         [("get_weather", WEATHER_ARGS)], None),
        ('Checking. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
         '{"name": "search", "arguments": ' + json.dumps(TRICKY_ARGS) + '}] ok',
         [("get_weather", WEATHER_ARGS), ("search", TRICKY_ARGS)], "Checking.  ok"),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}[TOOL_CALLS]search{"q": "[ARGS] }"}',
         [("get_weather", WEATHER_ARGS), ("search", {"q": "[ARGS] }"})], None),
        ("An array [1, 2] and [TOOL_CALL is not the marker", [],
         "An array [1, 2] and [TOOL_CALL is not the marker"),
    ],
    PythonicToolParser: [
        ("[get_weather(city='Paris', days=3)]", [("get_weather", WEATHER_ARGS)], None),
        ("[get_weather(city='Paris', days=3), get_time(tz=\"UTC\", opts={'a': [1, 2.5, None, True], 'b': (1,)}),]",
         [("get_weather", WEATHER_ARGS), ("get_time", {"tz": "UTC", "opts": {"a": [1, 2.5, None, True], "b": [1]}})],
         None),
        ("Sure thing.\n[search(q='a ) ] \\' ( \"', n=-1)] Anything else?",
         [("search", {"q": "a ) ] ' ( \"", "n": -1})], "Sure thing.\n Anything else?"),
        ("[ ping ( ) ]", [("ping", {})], None),
        ("See [the docs](http://x), a[i(0)] and [1, 2].", [], "See [the docs](http://x), a[i(0)] and [1, 2]."),
    ],
}

MALFORMED = {
    HermesToolParser: ["<tool_call>\nnot json\n</tool_call>", 'Hi <tool_call>{"foo": 1}</tool_call>',
                       '<tool_call>{"name": 3, "arguments": {}}</tool_call>', '<tool_call>{"name": "f"}</tool_call>',
                       '<tool_call>\n{"name": "get_weather", "argu'],
    Llama3JsonToolParser: ['{"answer": 42}', '<|python_tag|>print("hi")', '{"name": "Bob", "age": 3}'],
    MistralToolParser: ["[TOOL_CALLS]not a call", '[TOOL_CALLS][{"name": "f"}]', "[TOOL_CALLS][]",
                        '[TOOL_CALLS]bad name{"a": 1}'],
    PythonicToolParser: ["[f(1, 2)]", "[f(x=y)]", "[f(x={1, 2})]", "[f(**kw)]"],
}
# Broken only after a call's name went out: the whole output is content, but streaming cannot take back what it sent.
BROKEN_LATE = [
    (HermesToolParser, '<tool_call>{"name": "f", "arguments": {"a": 1}}} junk'),
    (Llama3JsonToolParser, '{"name": "f", "parameters": {"a": 1}}; nope'),
    (MistralToolParser, '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}} {"name": "g"}]'),
    (PythonicToolParser, "[f(x=1)"),
    (PythonicToolParser, "[f(x=1) g()]"),
]

CASES = [(cls, text) for cls, cases in VALID.items() for text, _, _ in cases]
MALFORMED_CASES = [(cls, text) for cls, texts in MALFORMED.items() for text in texts]


def _case_id(case) -> str:
    cls, text = case
    return f"{cls.name}:{text[:40]!r}"


# -- streaming harness ---------------------------------------------------------------------------------------------
@dataclass
class Streamed:
    content: Optional[str]
    calls: list[dict]
    streamed_tool_calls: bool


def stream(parser_cls: type[ToolParser], pieces: list[str]) -> Streamed:
    """Feeds pieces as deltas and assembles the result, checking the shape of every delta on the way."""
    parser = parser_cls()
    messages = [parser.extract_tool_calls_streaming(piece) for piece in pieces] + [parser.finish_streaming()]
    content, calls = [], []
    for message in messages:
        if message is None:
            continue
        assert message.role is None and message.reasoning_content is None
        assert message.content != ""
        assert message.content or message.tool_calls
        if message.content:
            content.append(message.content)
        for delta in message.tool_calls:
            if delta.id is not None:  # a call's first fragment: id, type and the complete name
                assert delta.index == len(calls)
                assert delta.type == "function" and delta.function.name and delta.function.arguments is None
                calls.append({"id": delta.id, "name": delta.function.name, "arguments": ""})
            else:  # then its arguments
                assert delta.index == len(calls) - 1 and delta.type is None
                assert delta.function.name is None and delta.function.arguments
                calls[-1]["arguments"] += delta.function.arguments
    return Streamed("".join(content) or None, calls, parser.streamed_tool_calls)


def assert_stream_matches(parser_cls: type[ToolParser], text: str, pieces: list[str]) -> None:
    assert "".join(pieces) == text
    expected = parser_cls().extract_tool_calls(text)
    got = stream(parser_cls, pieces)
    assert got.content == expected.content, pieces
    assert got.streamed_tool_calls == expected.tools_called
    assert [c["name"] for c in got.calls] == [tc.function.name for tc in expected.tool_calls]
    assert [json.loads(c["arguments"]) for c in got.calls] == [json.loads(tc.function.arguments)
                                                               for tc in expected.tool_calls], pieces
    for call in got.calls:
        assert_valid_id(parser_cls, call["id"])
    assert len({c["id"] for c in got.calls}) == len(got.calls)


def assert_valid_id(parser_cls: type[ToolParser], call_id: str) -> None:
    if parser_cls is MistralToolParser:
        assert re.fullmatch(r"[A-Za-z0-9]{9}", call_id), call_id
    else:
        assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", call_id), call_id


def random_pieces(text: str, rng: random.Random) -> list[str]:
    pieces, pos = [], 0
    while pos < len(text):
        size = rng.choice([1, 1, 2, 3, 5, 8, 13])
        pieces.append(text[pos:pos + size])
        pos += size
    return pieces


# -- whole output --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parser_cls, text, calls, content",
                         [(cls, *case) for cls, cases in VALID.items() for case in cases],
                         ids=[_case_id((cls, case[0])) for cls, cases in VALID.items() for case in cases])
def test_extract_tool_calls(parser_cls, text, calls, content):
    result = parser_cls().extract_tool_calls(text)
    assert result.tools_called == bool(calls)
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in result.tool_calls] == calls
    assert result.content == content
    for tc in result.tool_calls:
        assert tc.type == "function"
        assert_valid_id(parser_cls, tc.id)
        assert tc.function.arguments == json.dumps(json.loads(tc.function.arguments), ensure_ascii=False)


@pytest.mark.parametrize("parser_cls, text", MALFORMED_CASES, ids=[_case_id(c) for c in MALFORMED_CASES])
def test_malformed_call_is_content(parser_cls, text):
    result = parser_cls().extract_tool_calls(text)
    assert not result.tools_called and result.tool_calls == [] and result.content == text


@pytest.mark.parametrize("parser_cls, text", BROKEN_LATE, ids=[_case_id(c) for c in BROKEN_LATE])
def test_broken_after_the_name_is_content_and_streams_without_raising(parser_cls, text):
    result = parser_cls().extract_tool_calls(text)
    assert not result.tools_called and result.content == text
    for pieces in ([text], list(text)):
        got = stream(parser_cls, pieces)
        assert got.streamed_tool_calls and got.calls[0]["name"] == "f"


def test_arguments_are_compact_json_text():
    result = HermesToolParser().extract_tool_calls(
        '<tool_call>\n{"name": "f", "arguments": {"city": "Zürich",   "n": 1}}\n</tool_call>')
    assert result.tool_calls[0].function.arguments == '{"city": "Zürich", "n": 1}'


# -- streaming -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parser_cls, text", CASES + MALFORMED_CASES,
                         ids=[_case_id(c) for c in CASES + MALFORMED_CASES])
def test_streaming_matches_whole_output(parser_cls, text):
    assert_stream_matches(parser_cls, text, [text])
    assert_stream_matches(parser_cls, text, list(text))
    for split in range(len(text) + 1):
        assert_stream_matches(parser_cls, text, [text[:split], text[split:]])
    rng = random.Random(f"{parser_cls.name}:{text}")
    for _ in range(25):
        assert_stream_matches(parser_cls, text, random_pieces(text, rng))


@pytest.mark.parametrize("parser_cls, prefix, marker", [
    (HermesToolParser, '<tool_call>\n{"name": "f", "arguments": ', "<tool_call>"),
    (Llama3JsonToolParser, '<|python_tag|>{"name": "f", "parameters": ', "<|python_tag|>"),
    (MistralToolParser, '[TOOL_CALLS][{"name": "f", "arguments": ', "[TOOL_CALLS]"),
    (MistralToolParser, "[TOOL_CALLS]f[ARGS]", "[TOOL_CALLS]"),
])
def test_streaming_is_incremental(parser_cls, prefix, marker):
    """Content goes out as soon as it cannot start a marker; arguments go out as they arrive."""
    parser = parser_cls()
    for ch in "Hello, world. ":
        assert parser.extract_tool_calls_streaming(ch).content == ch
    held = [parser.extract_tool_calls_streaming(ch) for ch in marker[:-1]]
    assert held == [None] * (len(marker) - 1)
    parser.extract_tool_calls_streaming(marker[-1] + prefix[len(marker):])
    for piece in ['{"text": "', "a", "b", " ", "}", '"}']:
        message = parser.extract_tool_calls_streaming(piece)
        assert [d.function.arguments for d in message.tool_calls if d.id is None] == [piece]
    assert parser.streamed_tool_calls


def test_streaming_several_calls_in_one_delta():
    text = ('x<tool_call>{"name": "a", "arguments": {"k": 1}}</tool_call><tool_call>{"name": "b", '
            '"arguments": {}}</tool_call>y')
    parser = HermesToolParser()
    message = parser.extract_tool_calls_streaming(text)
    assert message.content == "xy"
    assert [(d.index, d.function.name, d.function.arguments) for d in message.tool_calls] == [
        (0, "a", None), (0, None, '{"k": 1}'), (1, "b", None), (1, None, "{}")]
    assert parser.finish_streaming() is None


def test_unfinished_call_without_name_is_given_back_as_content():
    parser = HermesToolParser()
    assert parser.extract_tool_calls_streaming('ok <tool_call>{"na') == DeltaMessage(content="ok ")
    assert parser.finish_streaming() == DeltaMessage(content='<tool_call>{"na')
    assert not parser.streamed_tool_calls


_FUZZ_TOKENS = ["<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "{", "}", "[", "]", "(",
                ")", '"name"', '"arguments"', '"parameters"', ":", ",", ";", '"f"', "'", '"', "\\", "=", "f(", "x",
                "1", "null", " ", "\n", "é"]


@pytest.mark.parametrize("parser_cls", list(TOOL_PARSERS.values()), ids=list(TOOL_PARSERS))
def test_never_raises_and_loses_no_text(parser_cls):
    rng = random.Random(parser_cls.name)
    for _ in range(400):
        text = "".join(rng.choice(_FUZZ_TOKENS) for _ in range(rng.randint(0, 30)))
        result = parser_cls().extract_tool_calls(text)
        if not result.tools_called:
            assert result.content == (text or None)
        got = stream(parser_cls, random_pieces(text, rng))
        if not got.streamed_tool_calls:  # whatever was not a call comes back as content, unchanged
            assert got.content == (text or None)


# -- registry ------------------------------------------------------------------------------------------------------
def test_registry():
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "mistral", "pythonic"}
    for name, cls in TOOL_PARSERS.items():
        assert get_tool_parser(name) is cls and cls.name == name
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, pythonic"):
        get_tool_parser("nope")
    assert MistralToolParser.keeps_special_tokens
    assert not any(cls.keeps_special_tokens for cls in (HermesToolParser, Llama3JsonToolParser, PythonicToolParser))


# -- Qwen2.5's real template and tokenizer -------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}]


@pytest.fixture(scope="module")
def qwen_tokenizer(shared_dir):
    path = shared_dir / "tokenizers" / "qwen2.5-instruct"
    if not (path / "tokenizer_config.json").is_file():
        pytest.skip(f"Qwen2.5 tokenizer not found at {path}")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def test_qwen25_template_teaches_the_hermes_format(qwen_tokenizer):
    prompt = qwen_tokenizer.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                                                tokenize=False, add_generation_prompt=True)
    assert ('<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in prompt)
    assert '"name": "get_weather"' in prompt and prompt.endswith("<|im_start|>assistant\n")


def incremental_detokenize(tokenizer, token_ids: list[int]) -> list[str]:
    """Text deltas as a server produces them: one per token, held while it ends in a partial character."""
    deltas, emitted = [], ""
    for end in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:end], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        deltas.append(text[len(emitted):])
        emitted = text
    return deltas


def test_qwen25_output_streamed_token_by_token(qwen_tokenizer):
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "°C"}}},
             {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}}]
    messages = [{"role": "user", "content": "Weather in Zürich and Tokyo?"},
                {"role": "assistant", "content": "Let me look that up.", "tool_calls": calls}]
    rendered = qwen_tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    # What the model writes after "<|im_start|>assistant\n": the template's own rendering of the calls.
    output = rendered.rsplit("<|im_start|>assistant\n", 1)[1].split("<|im_end|>")[0]
    assert output.count("<tool_call>") == 2

    result = HermesToolParser().extract_tool_calls(output)
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in result.tool_calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls]
    assert result.content.strip() == "Let me look that up."

    token_ids = qwen_tokenizer.encode(output, add_special_tokens=False)
    assert qwen_tokenizer.convert_tokens_to_ids("<tool_call>") in token_ids  # one token, kept by skip_special_tokens
    deltas = incremental_detokenize(qwen_tokenizer, token_ids)
    assert_stream_matches(HermesToolParser, output, deltas)


# -- generated outputs ---------------------------------------------------------------------------------------------
_STRING_CHARS = 'ab Z09_-"\'\\{}[]()<>:;,=\n\té☀東'


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.choice(["str", "int", "float", "bool", "none"] + (["list", "dict"] if depth < 3 else []))
    if kind == "str":
        return "".join(rng.choice(_STRING_CHARS) for _ in range(rng.randint(0, 12)))
    if kind == "int":
        return rng.randint(-10**6, 10**6)
    if kind == "float":
        return rng.choice([0.5, -2.25, 1e-7, 3.0e20])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return random_arguments(rng, depth + 1)


def random_arguments(rng: random.Random, depth: int = 0) -> dict:
    return {f"k{i}_{rng.choice('xyz')}": random_value(rng, depth) for i in range(rng.randint(0, 4))}


def render_calls(parser_cls: type[ToolParser], calls: list[tuple[str, dict]], rng: random.Random) -> str:
    space = rng.choice(["", " ", "\n"])
    if parser_cls is HermesToolParser:
        return "\n".join(f'<tool_call>{space}{json.dumps({"name": n, "arguments": a})}{space}</tool_call>'
                         for n, a in calls)
    if parser_cls is Llama3JsonToolParser:
        return "<|python_tag|>" + f"{space};{space}".join(
            json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls)
    if parser_cls is MistralToolParser:
        if rng.random() < 0.5:
            return "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in calls])
        return "".join(f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a)}" for n, a in calls)
    return "[" + f",{space}".join(f"{n}(" + ", ".join(f"{k}={v!r}" for k, v in a.items()) + ")"
                                 for n, a in calls) + "]"


@pytest.mark.parametrize("parser_cls", list(TOOL_PARSERS.values()), ids=list(TOOL_PARSERS))
def test_generated_outputs(parser_cls):
    rng = random.Random(f"generated:{parser_cls.name}")
    for _ in range(150):
        calls = [(rng.choice(["get_weather", "search", "f_2"]), random_arguments(rng))
                 for _ in range(rng.randint(1, 3))]
        before = rng.choice(["", "Sure. ", "a < b and [1] ", "\n\n"])
        text = before + render_calls(parser_cls, calls, rng)
        result = parser_cls().extract_tool_calls(text)
        assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in result.tool_calls] == calls, text
        assert (result.content or "").strip() == before.strip()  # hermes adds the newlines between blocks
        for _ in range(4):
            assert_stream_matches(parser_cls, text, random_pieces(text, rng))
