"""Reasoning parsers: whole-output splits, and streaming that, split anywhere, adds up to the same thing."""

from __future__ import annotations

import random

import pytest

from freight.entrypoints.openai.reasoning_parsers import (
    REASONING_PARSERS,
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    ReasoningParser,
    get_reasoning_parser,
)

NO_THINKING = {"enable_thinking": False}

# (parser class, chat_template_kwargs, model output, expected (reasoning_content, content))
CASES = [
    (DeepSeekR1ReasoningParser, None, "<think>abc</think>xyz", ("abc", "xyz")),
    (DeepSeekR1ReasoningParser, None, "abc</think>xyz", ("abc", "xyz")),
    (DeepSeekR1ReasoningParser, None, "\n<think>\nStep 1.\n</think>\n\nThe answer.",
     ("\nStep 1.\n", "\n\nThe answer.")),
    (DeepSeekR1ReasoningParser, None, "still thinking, cut off", ("still thinking, cut off", None)),
    (DeepSeekR1ReasoningParser, None, "<think>cut off", ("cut off", None)),
    (DeepSeekR1ReasoningParser, None, "</think>only content", (None, "only content")),
    (DeepSeekR1ReasoningParser, None, "done thinking</think>", ("done thinking", None)),
    (DeepSeekR1ReasoningParser, None, "a < b, </thin is no tag</think>x</think>y",
     ("a < b, </thin is no tag", "x</think>y")),
    (DeepSeekR1ReasoningParser, None, "<thin", ("<thin", None)),
    (DeepSeekR1ReasoningParser, None, "  ", ("  ", None)),
    (DeepSeekR1ReasoningParser, None, "", (None, None)),
    (Qwen3ReasoningParser, None, "<think>\nHmm.\n</think>\n\nHello!", ("\nHmm.\n", "\n\nHello!")),
    (Qwen3ReasoningParser, None, "Hmm.\n</think>\n\nHello!", ("Hmm.\n", "\n\nHello!")),
    (Qwen3ReasoningParser, {"enable_thinking": True}, "cut off", ("cut off", None)),
    # enable_thinking=False: the prompt already holds "<think>\n\n</think>\n\n", the output is the answer.
    (Qwen3ReasoningParser, NO_THINKING, "Hello!", (None, "Hello!")),
    (Qwen3ReasoningParser, NO_THINKING, "Hello </think> there", (None, "Hello </think> there")),
    (Qwen3ReasoningParser, NO_THINKING, "<think>a</think>b", ("a", "b")),
    (Qwen3ReasoningParser, NO_THINKING, " <thi", (None, " <thi")),
    (Qwen3ReasoningParser, NO_THINKING, "\n\n", (None, "\n\n")),
]


def _case_id(case) -> str:
    cls, kwargs, text, _ = case
    return f"{cls.name}{'-no-thinking' if kwargs == NO_THINKING else ''}:{text[:30]!r}"


def make(cls: type[ReasoningParser], kwargs) -> ReasoningParser:
    return cls(chat_template_kwargs=kwargs)


def stream(parser: ReasoningParser, pieces: list[str]) -> tuple:
    reasoning, content = [], []
    messages = [parser.extract_reasoning_streaming(piece) for piece in pieces] + [parser.finish_streaming()]
    for message in messages:
        if message is None:
            continue
        assert message.tool_calls == [] and message.role is None
        assert message.reasoning_content or message.content
        assert message.reasoning_content != "" and message.content != ""
        if any(content):  # reasoning never comes back once content started
            assert message.reasoning_content is None
        reasoning.append(message.reasoning_content or "")
        content.append(message.content or "")
    return "".join(reasoning) or None, "".join(content) or None


def random_pieces(text: str, rng: random.Random) -> list[str]:
    pieces, pos = [], 0
    while pos < len(text):
        size = rng.choice([1, 1, 2, 3, 5, 8])
        pieces.append(text[pos:pos + size])
        pos += size
    return pieces


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_extract_reasoning(case):
    cls, kwargs, text, expected = case
    assert make(cls, kwargs).extract_reasoning(text) == expected


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_streaming_matches_whole_output(case):
    cls, kwargs, text, expected = case
    splits = [[text], list(text)] + [[text[:i], text[i:]] for i in range(len(text) + 1)]
    rng = random.Random(text)
    splits += [random_pieces(text, rng) for _ in range(25)]
    for pieces in splits:
        assert stream(make(cls, kwargs), pieces) == expected, pieces


def test_is_reasoning_end_follows_the_end_tag():
    parser = DeepSeekR1ReasoningParser()
    assert parser.extract_reasoning_streaming("<think>plan").reasoning_content == "plan"
    assert not parser.is_reasoning_end()
    assert parser.extract_reasoning_streaming(" more</thi").reasoning_content == " more"
    assert not parser.is_reasoning_end()
    message = parser.extract_reasoning_streaming("nk>\n\n<tool_call>")
    assert message.reasoning_content is None and message.content == "\n\n<tool_call>"
    assert parser.is_reasoning_end()
    assert parser.extract_reasoning_streaming("x").content == "x"
    assert parser.finish_streaming() is None


def test_reasoning_streams_as_it_arrives():
    parser = Qwen3ReasoningParser()
    for piece in ["Let", " me", " think", " <", "b>"]:
        message = parser.extract_reasoning_streaming(piece)
        if piece == " <":  # may be the start of </think>: held back
            assert message.reasoning_content == " "
        elif piece == "b>":
            assert message.reasoning_content == "<b>"
        else:
            assert message.reasoning_content == piece


def test_without_thinking_the_output_is_content_at_once():
    parser = Qwen3ReasoningParser(chat_template_kwargs=NO_THINKING)
    assert parser.extract_reasoning_streaming("Hi").content == "Hi"
    assert parser.is_reasoning_end()


def test_registry():
    assert set(REASONING_PARSERS) == {"deepseek_r1", "qwen3"}
    for name, cls in REASONING_PARSERS.items():
        assert get_reasoning_parser(name) is cls and cls.name == name
        assert cls.start_tag == "<think>" and cls.end_tag == "</think>"
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        get_reasoning_parser("nope")
