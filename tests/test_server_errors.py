"""Every error the server promises: its status, OpenAI's JSON shape, and a server that
keeps serving afterwards. Also 503 past the waiting-queue limit and a model without a chat
template. (Signals, the drain and a dying engine core: test_engine_core_proc.py.)"""

from __future__ import annotations

import signal
import threading

import httpx
import openai
import pytest

from server_utils import (API_KEY, SERVED_NAME, RemoteServer, chat_model_dir, server,  # noqa: F401
                          wait_for_idle)

USER = [{"role": "user", "content": "Hi"}]
LONG_IDS = [300] * 600  # longer than the 512-token context

COMPLETION_ERRORS = {
    "negative max_tokens": ({"prompt": "Hi", "max_tokens": -1}, 400, "max_tokens"),
    "zero max_tokens": ({"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    "temperature above 2": ({"prompt": "Hi", "temperature": 3.0}, 400, "temperature"),
    "negative temperature": ({"prompt": "Hi", "temperature": -0.5}, 400, "temperature"),
    "top_p zero": ({"prompt": "Hi", "top_p": 0}, 400, "top_p"),
    "n zero": ({"prompt": "Hi", "n": 0}, 400, "n"),
    "logprobs too many": ({"prompt": "Hi", "logprobs": 50}, 400, "logprobs"),
    "prompt longer than context": ({"prompt": LONG_IDS}, 400, "prompt"),
    "prompt plus max_tokens over context": ({"prompt": [300] * 500, "max_tokens": 100}, 400, "max_tokens"),
    "token id outside vocab": ({"prompt": [1, 100000]}, 400, "prompt"),
    "empty prompt list": ({"prompt": []}, 400, "prompt"),
    "missing prompt": ({"max_tokens": 3}, 400, "prompt"),
    "wrong type": ({"prompt": "Hi", "max_tokens": "many"}, 400, "max_tokens"),
    "unknown parameter": ({"prompt": "Hi", "frobnicate": 1}, 400, "frobnicate"),
    "unsupported vLLM parameter": ({"prompt": "Hi", "bad_words": ["once"]}, 400, "bad_words"),
    "bad guided_json": ({"prompt": "Hi", "guided_json": "{not json"}, 400, "guided_json"),
    "suffix": ({"prompt": "Hi", "suffix": "end"}, 400, "suffix"),
    "stream_options without stream": ({"prompt": "Hi", "stream_options": {"include_usage": True}}, 400,
                                      "stream_options"),
    "bad stop": ({"prompt": "Hi", "stop": [""]}, 400, "stop"),
    "unknown model": ({"prompt": "Hi", "model": "gpt-9"}, 404, "model"),
}

CHAT_ERRORS = {
    "no messages": ({}, 400, "messages"),
    "empty messages": ({"messages": []}, 400, "messages"),
    "message not an object": ({"messages": ["hello"]}, 400, "messages[0]"),
    "missing role": ({"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    "tool role without its call id": ({"messages": [{"role": "tool", "content": "x"}]}, 400,
                                      "messages[0].tool_call_id"),
    "missing content": ({"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    "content not text": ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    "image part": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages[0].content[0]"),
    "auto tools without a parser": ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
                                    400, "tool_choice"),
    "unknown response_format": ({"messages": USER, "response_format": {"type": "xml"}}, 400,
                                "response_format.type"),
    "top_logprobs without logprobs": ({"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    "negative max_completion_tokens": ({"messages": USER, "max_completion_tokens": -3}, 400,
                                       "max_completion_tokens"),
    "temperature above 2": ({"messages": USER, "temperature": 2.5}, 400, "temperature"),
    "messages longer than context": ({"messages": [{"role": "user", "content": "a b " * 400}]}, 400, "messages"),
    "unknown model": ({"messages": USER, "model": "gpt-9"}, 404, "model"),
}


def assert_openai_error(r: httpx.Response, status: int, param=None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_still_serving(server) -> None:
    r = httpx.post(server.url("/v1/completions"), headers=server.headers(), timeout=60,
                   json={"model": SERVED_NAME, "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("case", list(COMPLETION_ERRORS))
def test_completion_errors(server, case):
    body, status, param = COMPLETION_ERRORS[case]
    r = httpx.post(server.url("/v1/completions"), json=body, headers=server.headers(), timeout=60)
    assert_openai_error(r, status, param)
    assert_still_serving(server)


@pytest.mark.parametrize("case", list(CHAT_ERRORS))
def test_chat_errors(server, case):
    body, status, param = CHAT_ERRORS[case]
    r = httpx.post(server.url("/v1/chat/completions"), json=body, headers=server.headers(), timeout=60)
    assert_openai_error(r, status, param)
    assert_still_serving(server)


@pytest.mark.parametrize("raw", [b'{"prompt": "Hi", ', b"not json at all", b"[1, 2, 3]", b""])
def test_malformed_bodies(server, raw):
    headers = dict(server.headers(), **{"Content-Type": "application/json"})
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(server.url(path), content=raw, headers=headers, timeout=60)
        assert_openai_error(r, 400)
    assert_still_serving(server)


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(server.url("/v1/completions"), json={"prompt": "Hi"}, headers=headers)
        err = assert_openai_error(r, 401)
        assert err["code"] == "invalid_api_key"
        assert_openai_error(httpx.get(server.url("/v1/models"), headers=headers), 401)
        assert_openai_error(httpx.post(server.url("/tokenize"), json={"prompt": "x"}, headers=headers), 401)
    # health, metrics and version stay open
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/metrics")).status_code == 200
    assert httpx.get(server.url("/version")).status_code == 200
    assert_still_serving(server)


def test_openai_client_exceptions(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=-5)
    assert e.value.status_code == 400 and e.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    with pytest.raises(openai.BadRequestError):  # errors of streamed requests come before the stream starts
        client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "bad", "content": "x"}], stream=True)
    assert client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=1).usage.completion_tokens == 1


def test_unknown_routes_and_methods(server):
    assert_openai_error(httpx.get(server.url("/v1/nope"), headers=server.headers()), 404)
    assert_openai_error(httpx.get(server.url("/v1/completions"), headers=server.headers()), 405)
    assert_openai_error(httpx.post(server.url("/detokenize"), json={"tokens": [10**6]}, headers=server.headers()),
                        400, "tokens")
    assert_openai_error(httpx.post(server.url("/tokenize"), json={}, headers=server.headers()), 400)


# -- a second, deliberately tiny server: one sequence at a time, one waiting, no chat template ------
@pytest.fixture(scope="module")
def small_server(stories_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("small_server") / "server.log"
    srv = RemoteServer(stories_dir, ["--max-num-seqs", "1", "--max-waiting-requests", "1",
                                     "--disable-uvicorn-access-log"], log)
    yield srv
    srv.stop(signal.SIGKILL) if srv.proc.poll() is None else None


def test_no_chat_template(small_server):
    r = httpx.post(small_server.url("/v1/chat/completions"), json={"messages": USER}, timeout=60)
    err = assert_openai_error(r, 400, "messages")
    assert "chat template" in err["message"]


def test_overload_503(small_server):
    """With one running and one waiting, the other requests sent at the same moment get 503."""
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    results: list = [None] * 6
    barrier = threading.Barrier(6)
    # Accepted requests keep their connections until every request has its status (a stream's status
    # comes with its headers, before any token): an early hang-up would free a slot for a latecomer.
    all_answered = threading.Barrier(6)

    def send(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            barrier.wait()
            with c.stream("POST", small_server.url("/v1/completions"), json=body) as r:
                if r.status_code != 200:
                    r.read()
                    results[i] = r
                else:
                    results[i] = 200
                all_answered.wait(60)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = [r for r in results if isinstance(r, httpx.Response)]
    assert 1 <= len(results) - len(refused) <= 2 and len(refused) >= 4, results
    for r in refused:
        err = assert_openai_error(r, 503)
        assert err["code"] == "server_overloaded"
        assert int(r.headers["retry-after"]) >= 1
    wait_for_idle(small_server)
    r = httpx.post(small_server.url("/v1/completions"), json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
