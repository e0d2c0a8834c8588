"""tool_choice plans and the calls a forced choice produces (freight/entrypoints/openai/tool_calls.py)."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from freight.entrypoints.openai.errors import APIError
from freight.entrypoints.openai.tool_calls import ForcedToolCallStream, forced_tool_calls, plan_tools

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time"}}]
REQUIRED_REPLY = ('[{"name": "get_weather", "parameters": {"city": "Pa\\"ris}]", "days": 3}}, '
                  '{"name":"get_time","parameters":{}}, {"name": "get_weather", "parameters": '
                  '{"city": "{[Oslo]}", "days": 10}}]')


def _assemble(stream: ForcedToolCallStream, pieces: list[str]) -> list[dict]:
    calls: dict[int, dict] = {}
    for piece in pieces:
        for d in stream.feed(piece):
            entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert entry["id"] is None
                entry["id"] = d.id
            if d.function.name:
                assert entry["name"] is None
                entry["name"] = d.function.name
            entry["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)]


def test_required_constraint_accepts_exactly_the_calls():
    schema = plan_tools(TOOLS, "required", False).constraint()["json"]
    jsonschema.validate(json.loads(REQUIRED_REPLY), schema)
    for bad in ([], [{"name": "get_weather", "parameters": {"city": "x"}}], [{"name": "other", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = plan_tools(TOOLS, "required", False, parallel_tool_calls=False).constraint()["json"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(REQUIRED_REPLY), single)


def test_named_constraint_is_the_parameters_schema():
    plan = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, False)
    assert plan.constraint() == {"json": WEATHER}
    no_params = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}}, False)
    assert no_params.constraint()["json"]["type"] == "object"


@pytest.mark.parametrize("choice, auto, error", [
    ("auto", False, "enable-auto-tool-choice"), ("sometimes", True, "tool_choice"),
    ({"type": "function", "function": {"name": "nope"}}, True, "nope"), ({"type": "function"}, True, "function"),
])
def test_bad_plans(choice, auto, error):
    with pytest.raises(APIError, match=error):
        plan_tools(TOOLS, choice, auto)


def test_forced_calls_whole_reply():
    plan = plan_tools(TOOLS, "required", False)
    calls = forced_tool_calls(plan, REQUIRED_REPLY)
    assert [c.function.name for c in calls] == ["get_weather", "get_time", "get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": 'Pa"ris}]', "days": 3}
    assert forced_tool_calls(plan, REQUIRED_REPLY[:40]) is None  # cut short: stays text


def test_required_stream_at_every_split_and_in_random_pieces():
    plan = plan_tools(TOOLS, "required", False)
    whole = forced_tool_calls(plan, REQUIRED_REPLY)
    rng = random.Random(0)
    splits = [[REQUIRED_REPLY[:i], REQUIRED_REPLY[i:]] for i in range(len(REQUIRED_REPLY) + 1)]
    splits.append(list(REQUIRED_REPLY))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(REQUIRED_REPLY)), 12))
        splits.append([REQUIRED_REPLY[a:b] for a, b in zip([0] + cuts, cuts + [len(REQUIRED_REPLY)])])
    for pieces in splits:
        calls = _assemble(ForcedToolCallStream(plan), pieces)
        assert [c["name"] for c in calls] == [c.function.name for c in whole]
        assert [json.loads(c["arguments"]) for c in calls] == [json.loads(c.function.arguments) for c in whole]
        assert all(c["id"].startswith("chatcmpl-tool-") for c in calls)


def test_named_stream_sends_the_reply_as_arguments():
    plan = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, False)
    text = '{"city": "Rome", "days": 2}'
    calls = _assemble(ForcedToolCallStream(plan), [text[i:i + 3] for i in range(0, len(text), 3)])
    assert calls == [{"id": calls[0]["id"], "name": "get_weather", "arguments": text}]
