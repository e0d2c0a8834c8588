"""Structured outputs and tool calling through `freight serve`, with the official openai client.

The server runs a seeded random-weight Qwen2 model that carries the real Qwen2.5
tokenizer and chat template (which teaches the hermes <tool_call> format), with
`--enable-auto-tool-choice --tool-call-parser hermes` (and its own server per reasoning
parser in the reasoning test). Its
output is noise, so every constraint here bounds its strings and numbers; what is
checked is that each constrained reply validates (jsonschema, re.fullmatch), at
temperature > 0 over several seeds, and that tool calls and their streamed deltas
come out in OpenAI's shape.

For tool_choice "auto" a random model never writes a call by itself: the tests force
the hermes text with a regex constraint, so the server's parser meets real model
output (tokens, incremental detokenization, streaming).
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest

from server_utils import RemoteServer, chat_model_dir, server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(600)

QWEN_VOCAB = 151936
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 14}},
           "required": ["city", "days"]}
TIME = {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
        "required": ["tz"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
MESSAGES = [{"role": "user", "content": "What's the weather in Paris for the next 3 days?"}]
HERMES_CALL = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,8}", '
               r'"days": [1-9]\}\}\n</tool_call>')


@pytest.fixture(scope="module")
def qwen_tools_model(shared_dir, tmp_path_factory):
    from model_factory import make_model

    return make_model(tmp_path_factory.mktemp("qwen_tools") / "qwen-tools", "qwen2",
                      tokenizer_dir=shared_dir / "tokenizers" / "qwen2.5-instruct", vocab_size=QWEN_VOCAB,
                      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def srv(qwen_tools_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("so_server") / "server.log"
    s = RemoteServer(qwen_tools_model, [
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--structured-outputs-config", '{"disable_any_whitespace": true}', "--kv-cache-memory", "64MiB"], log)
    yield s
    assert s.stop() == 0, s.log_tail()


@pytest.fixture(scope="module")
def client(srv):
    return srv.client()


def model(srv) -> str:
    return str(srv.client().models.list().data[0].id)


# -- structured outputs -------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_sampled_validates(srv, client, seed):
    r = client.chat.completions.create(
        model=model(srv), messages=MESSAGES, max_tokens=120, temperature=1.0, seed=seed, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER,
                                                                "strict": True}})
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), WEATHER)


def test_json_schema_streamed_validates(srv, client):
    stream = client.chat.completions.create(
        model=model(srv), messages=MESSAGES, max_tokens=120, temperature=0.8, seed=7, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}})
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), WEATHER)


def test_json_object_on_completions(srv, client, qwen_tools_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen_tools_model))
    # Noise never closes a string by itself: favour the closing characters so the object completes.
    bias = {str(tok.convert_tokens_to_ids(t)): 30 for t in ('"', "}")}
    for seed in range(3):
        r = client.completions.create(model=model(srv), prompt="JSON:", max_tokens=60, temperature=1.0, seed=seed,
                                      logit_bias=bias, extra_body={"response_format": {"type": "json_object"}})
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].text), dict)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regex_choice_and_grammars_sampled(srv, client, seed):
    def complete(constraint, **kw):
        r = client.completions.create(model=model(srv), prompt="Answer:", max_tokens=40, temperature=1.0, seed=seed,
                                      extra_body={"structured_outputs": constraint}, **kw)
        assert r.choices[0].finish_reason == "stop", r
        return r.choices[0].text

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", complete({"regex": r"[0-9]{3}-[a-z]{2,4}"}))
    assert complete({"choice": ["red", "green", "blue"]}) in ("red", "green", "blue")
    assert re.fullmatch(r"a[bc]{0,5}d", complete({"grammar": 'root ::= "a" rest\nrest ::= [bc] rest | "d"'}))
    # Lark (llguidance's syntax, translated for xgrammar): a bounded run of digits.
    assert re.fullmatch(r"x[0-9]{1,4}", complete({"grammar": 'start: "x" DIGITS\nDIGITS: /[0-9]{1,4}/'}))


def test_legacy_guided_fields(srv, client):
    r = client.completions.create(model=model(srv), prompt="Q", max_tokens=20, temperature=0.7, seed=1,
                                  extra_body={"guided_regex": "(yes|no)!"})
    assert r.choices[0].text in ("yes!", "no!")


def test_parse_helper_with_pydantic_model(srv, client):
    class Forecast(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=10)
        days: int = pydantic.Field(ge=1, le=7)
        sunny: bool

    for seed in range(2):
        parsed = client.chat.completions.parse(model=model(srv), messages=MESSAGES, max_tokens=100,
                                               temperature=0.9, seed=seed, response_format=Forecast)
        value = parsed.choices[0].message.parsed
        assert isinstance(value, Forecast) and 1 <= value.days <= 7 and len(value.city) <= 10


@pytest.mark.parametrize("body, param", [
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"jsonn": {}}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"guided_regex": "[z-a]"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format"),
])
def test_bad_constraints_are_400(srv, body, param):
    for path, base in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": MESSAGES})):
        r = httpx.post(srv.url(path), json={**base, "max_tokens": 5, **body}, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param, err
        assert err["message"]
    assert httpx.get(srv.url("/health"), timeout=10).status_code == 200


def test_constrained_neighbours_leave_unconstrained_tokens_alone(srv):
    client = srv.async_client()

    async def plain():
        r = await client.completions.create(model=model(srv), prompt="The weather in Paris", max_tokens=24,
                                            temperature=0.9, seed=11)
        return r.choices[0].text

    async def constrained(i):
        return await client.completions.create(
            model=model(srv), prompt=f"Forecast {i}", max_tokens=60, temperature=1.0, seed=i,
            extra_body={"structured_outputs": {"json": WEATHER}})

    async def run():
        alone = await plain()
        together = await asyncio.gather(plain(), *(constrained(i) for i in range(6)), plain())
        return alone, together

    alone, together = asyncio.run(run())
    assert together[0] == alone and together[-1] == alone
    for r in together[1:-1]:
        jsonschema.validate(json.loads(r.choices[0].text), WEATHER)


# -- tool calling -----------------------------------------------------------------------------
def _check_calls(calls):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        schema = WEATHER if call.function.name == "get_weather" else TIME
        assert call.function.name in ("get_weather", "get_time")
        jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tool_choice_required(srv, client, seed):
    # This noise model prefers another call to closing the array; parallel_tool_calls=false allows one.
    r = client.chat.completions.create(model=model(srv), messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                       max_tokens=150, temperature=1.0, seed=seed, parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    _check_calls(c.message.tool_calls)
    assert len(c.message.tool_calls) == 1


def test_tool_choice_required_parallel_calls(srv, client):
    r = client.chat.completions.create(model=model(srv), messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                       max_tokens=400, temperature=1.0, seed=0)
    c = r.choices[0]
    if c.finish_reason == "length":  # a long array cut short is returned as text
        assert not c.message.tool_calls and re.match(r'\[\{"name":\s?"get_', c.message.content)
    else:
        _check_calls(c.message.tool_calls)


def test_tool_choice_named(srv, client):
    for seed in range(3):
        r = client.chat.completions.create(model=model(srv), messages=MESSAGES, tools=TOOLS, max_tokens=80,
                                           temperature=1.0, seed=seed,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
        c = r.choices[0]
        assert c.finish_reason == "stop"  # OpenAI and vLLM: a forced function ends with "stop"
        assert [t.function.name for t in c.message.tool_calls] == ["get_time"]
        _check_calls(c.message.tool_calls)


def _assemble(stream):
    """Tool calls from streamed deltas: the id and name come once, arguments in fragments."""
    calls, content, finish = {}, "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                assert entry["id"] is None, "the id is sent once"
                entry["id"] = tc.id
            if tc.function and tc.function.name:
                assert entry["name"] is None, "the name is sent once"
                entry["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                entry["arguments"] += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    return [calls[i] for i in sorted(calls)], content, finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_forced_tool_calls_assemble(srv, client, tool_choice):
    kw = dict(model=model(srv), messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, max_tokens=150,
              temperature=1.0, seed=5, parallel_tool_calls=False)
    full = client.chat.completions.create(**kw).choices[0]
    calls, content, finish = _assemble(client.chat.completions.create(stream=True, **kw))
    assert finish == full.finish_reason and not content
    assert [c["name"] for c in calls] == [t.function.name for t in full.message.tool_calls]
    for c, t in zip(calls, full.message.tool_calls):
        assert c["id"].startswith("chatcmpl-tool-")
        assert json.loads(c["arguments"]) == json.loads(t.function.arguments)


def test_auto_tool_choice_parses_hermes_calls(srv, client):
    kw = dict(model=model(srv), messages=MESSAGES, tools=TOOLS, max_tokens=120, temperature=0.8, seed=3,
              extra_body={"structured_outputs": {"regex": r"Checking\. " + HERMES_CALL}})
    c = client.chat.completions.create(**kw).choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content == "Checking. "
    _check_calls(c.message.tool_calls)
    assert [t.function.name for t in c.message.tool_calls] == ["get_weather"]
    calls, content, finish = _assemble(client.chat.completions.create(stream=True, **kw))
    assert finish == "tool_calls" and content == "Checking. "
    assert json.loads(calls[0]["arguments"]) == json.loads(c.message.tool_calls[0].function.arguments)


def test_auto_tool_choice_without_a_call_is_content(srv, client):
    r = client.chat.completions.create(model=model(srv), messages=MESSAGES, tools=TOOLS, tool_choice="auto",
                                       max_tokens=20,
                                       extra_body={"structured_outputs": {"regex": "No tool [a-z]{1,5}"}})
    c = r.choices[0]
    assert c.message.content.startswith("No tool") and not c.message.tool_calls and c.finish_reason == "stop"


def test_tool_messages_render_into_the_template(srv, client):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24C"}]
    r = httpx.post(srv.url("/tokenize"), json={"messages": history, "tools": TOOLS}, timeout=60)
    assert r.status_code == 200, r.text
    text = httpx.post(srv.url("/detokenize"), json={"tokens": r.json()["tokens"]}, timeout=60).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>' in text
    assert "<tool_response>\nSunny, 24C\n</tool_response>" in text
    assert '"name": "get_time"' in text  # the tools are in the system prompt
    reply = client.chat.completions.create(model=model(srv), messages=history, tools=TOOLS, max_tokens=5)
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0]"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
])
def test_bad_tool_requests_are_400(srv, body, param):
    r = httpx.post(srv.url("/v1/chat/completions"), json={"messages": MESSAGES, "max_tokens": 5, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_auto_tool_choice_needs_the_flag(server):
    """The shared stories server runs without --enable-auto-tool-choice: "auto" is refused, "none" works."""
    from server_utils import SERVED_NAME

    client = server.client()
    with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
        client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=4)
    r = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                       max_tokens=4)
    assert r.choices[0].message.tool_calls == [] and r.choices[0].message.content is not None


# -- reasoning -------------------------------------------------------------------------------
@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
def test_reasoning_parser_splits_think_text(qwen_tools_model, tmp_path, parser):
    log = tmp_path / "server.log"
    s = RemoteServer(qwen_tools_model, ["--reasoning-parser", parser, "--structured-outputs-config",
                                        '{"disable_any_whitespace": true}'], log)
    try:
        client = s.client()
        kw = dict(model=model(s), messages=MESSAGES, max_tokens=60, temperature=0.7, seed=2, extra_body={
            "structured_outputs": {"regex": "<think>\nplan [a-z]{2,6}\n</think>\n\nDone [0-9]{1,2}"}})
        msg = client.chat.completions.create(**kw).choices[0].message
        assert re.fullmatch(r"\s*plan [a-z]{2,6}\s*", msg.reasoning_content), msg
        assert re.fullmatch(r"\s*Done [0-9]{1,2}", msg.content), msg
        reasoning, content = "", ""
        for chunk in client.chat.completions.create(stream=True, **kw):
            if chunk.choices:
                d = chunk.choices[0].delta
                reasoning += getattr(d, "reasoning_content", None) or ""
                content += d.content or ""
        assert reasoning == msg.reasoning_content and content == msg.content
    finally:
        assert s.stop() == 0, s.log_tail()


def test_offline_chat_renders_tools(qwen_tools_model):
    """LLM.chat(tools=...) as in vLLM: the tools reach the template; a JSON constraint gives a valid call."""
    from freight import LLM, SamplingParams
    from freight.sampling_params import StructuredOutputsParams

    llm = LLM(str(qwen_tools_model), dtype="float32", kv_cache_memory="16MiB",
              structured_outputs_config={"disable_any_whitespace": True})
    prompt = llm.apply_chat_template(MESSAGES, tools=TOOLS)["prompt"]
    assert "<tools>" in prompt and '"name": "get_time"' in prompt
    out = llm.chat(MESSAGES, SamplingParams(max_tokens=60, temperature=0.8, seed=1,
                                            structured_outputs=StructuredOutputsParams(json=TIME)),
                   tools=TOOLS, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), TIME)
