"""One request never hurts another: strict validation at the edge, size and count limits, request
chat templates, a responsive event loop, and fault isolation inside the engine step.

Each repro from the robustness issue has a case here: out-of-range seeds, strings where booleans or
integers belong, lone surrogates, an empty body, huge bodies, too many prompts, a slow request
template, lower-case "bearer", 405 without Allow, 503 without Retry-After, 500s that leaked
exception text, and a poisoned request in a batch (the others' greedy text must not change).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest

from server_utils import SERVED_NAME, RemoteServer, chat_model_dir, server  # noqa: F401
from test_server_errors import assert_openai_error, assert_still_serving

USER = [{"role": "user", "content": "Hi"}]

# (endpoint, body, status, param): raw JSON strings are sent as they are (lone surrogates).
BAD_INPUTS = {
    "seed past 64 bits": ("/v1/completions", {"prompt": "Hi", "seed": 2**64}, 400, "seed"),
    "seed + n past 64 bits": ("/v1/completions", {"prompt": "Hi", "seed": 2**64 - 1, "n": 2}, 400, "seed"),
    "negative seed past 64 bits": ("/v1/completions", {"prompt": "Hi", "seed": -2**63 - 1}, 400, "seed"),
    "stream as a string": ("/v1/completions", {"prompt": "Hi", "stream": "yes"}, 400, "stream"),
    "echo as a number": ("/v1/completions", {"prompt": "Hi", "echo": 1}, 400, "echo"),
    "ignore_eos as a string": ("/v1/completions", {"prompt": "Hi", "ignore_eos": "x"}, 400, "ignore_eos"),
    "skip_special_tokens as a string": ("/v1/completions", {"prompt": "Hi", "skip_special_tokens": "no"}, 400,
                                        "skip_special_tokens"),
    "include_stop_str_in_output as a number": ("/v1/chat/completions",
                                               {"messages": USER, "include_stop_str_in_output": 0}, 400,
                                               "include_stop_str_in_output"),
    "booleans as token ids": ("/v1/completions", {"prompt": [True, False]}, 400, "prompt[0]"),
    "max_tokens as a boolean": ("/v1/completions", {"prompt": "Hi", "max_tokens": True}, 400, "max_tokens"),
    "max_tokens as a string": ("/v1/chat/completions", {"messages": USER, "max_tokens": "5"}, 400, "max_tokens"),
    "temperature as a string": ("/v1/completions", {"prompt": "Hi", "temperature": "0.5"}, 400, "temperature"),
    "top_k as a float": ("/v1/completions", {"prompt": "Hi", "top_k": 1.5}, 400, "top_k"),
    "min_tokens as a string": ("/v1/completions", {"prompt": "Hi", "min_tokens": "2"}, 400, "min_tokens"),
    "stop_token_ids as strings": ("/v1/completions", {"prompt": "Hi", "stop_token_ids": ["a"]}, 400,
                                  "stop_token_ids"),
    "stop_token_ids outside the vocabulary": ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [10**6]}, 400,
                                              "stop_token_ids"),
    "logit_bias key not a token id": ("/v1/completions", {"prompt": "Hi", "logit_bias": {"x": 1}}, 400,
                                      "logit_bias"),
    "n far too large": ("/v1/completions", {"prompt": "Hi", "n": 1000}, 400, "n"),
    "too many prompts": ("/v1/completions", {"prompt": ["Hi"] * 300, "max_tokens": 1}, 400, "prompt"),
    "prompts times n too many": ("/v1/completions", {"prompt": ["Hi"] * 100, "n": 2, "max_tokens": 1}, 400, "n"),
    "lone surrogate in a prompt": ("/v1/completions", '{"prompt": "\\ud800"}', 400, "prompt"),
    "lone surrogate in a prompt list": ("/v1/completions", '{"prompt": ["ok", "a\\udfff"]}', 400, "prompt[1]"),
    "lone surrogate in a stop string": ("/v1/completions", '{"prompt": "Hi", "stop": "\\ud800"}', 400, "stop"),
    "lone surrogate in a chat message": ("/v1/chat/completions",
                                         '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400,
                                         "messages[0].content"),
    "lone surrogate to /tokenize": ("/tokenize", '{"prompt": "\\ud800"}', 400, "prompt"),
    "request chat template not trusted": ("/v1/chat/completions", {"messages": USER, "chat_template": "{{ 1 }}"},
                                          400, "chat_template"),
    "detokenize booleans": ("/detokenize", {"tokens": [True]}, 400, "tokens[0]"),
}


def _post(server, path: str, body, **kw) -> httpx.Response:
    headers = dict(server.headers(), **{"Content-Type": "application/json"})
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    return httpx.post(server.url(path), content=content, headers=headers, timeout=60, **kw)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_400_naming_the_field(server, case):  # noqa: F811
    path, body, status, param = BAD_INPUTS[case]
    r = _post(server, path, body)
    err = assert_openai_error(r, status, param)
    assert param.split("[")[0].split(".")[0] in err["message"] or param in err["message"], err
    assert_still_serving(server)


def test_empty_body_says_what_is_missing(server):  # noqa: F811
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        err = assert_openai_error(_post(server, path, ""), 400)
        assert "None" not in err["message"] and "body" in err["message"], err


def test_bearer_scheme_is_case_insensitive(server):  # noqa: F811
    for scheme in ("bearer", "BEARER", "Bearer"):
        r = httpx.get(server.url("/v1/models"), headers={"Authorization": f"{scheme} {server.api_key}"}, timeout=30)
        assert r.status_code == 200, (scheme, r.text)
    assert_openai_error(httpx.get(server.url("/v1/models"), headers={"Authorization": f"Basic {server.api_key}"},
                                  timeout=30), 401)
    # Open without the key, as documented: health checks, metrics scrapers, version.
    for path in ("/health", "/ping", "/version", "/metrics"):
        assert httpx.get(server.url(path), timeout=30).status_code == 200, path
    assert httpx.post(server.url("/ping"), timeout=30).status_code == 200


def test_405_names_the_allowed_methods(server):  # noqa: F811
    r = httpx.get(server.url("/v1/completions"), headers=server.headers(), timeout=30)
    assert_openai_error(r, 405)
    assert r.headers.get("allow") == "POST"


def test_openapi_lists_the_error_responses(server):  # noqa: F811
    doc = httpx.get(server.url("/openapi.json"), headers=server.headers(), timeout=30).json()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"400", "401", "413", "503"} <= set(responses), (path, sorted(responses))
        assert "422" not in responses, "validation errors are answered with 400, never 422"
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


# -- limits and a responsive event loop: a server of its own ------------------------------------------
@pytest.fixture(scope="module")
def limited_server(chat_model_dir, tmp_path_factory):  # noqa: F811
    srv = RemoteServer(chat_model_dir, ["--max-request-body-size", "1MiB", "--trust-request-chat-template",
                                        "--disable-uvicorn-access-log", "--served-model-name", SERVED_NAME],
                       tmp_path_factory.mktemp("limited") / "server.log")
    yield srv
    srv.stop(signal.SIGKILL) if srv.proc.poll() is None else None


def test_body_over_the_limit_is_413(limited_server):
    big = {"prompt": "a " * 600_000}  # 1.2 MB
    assert_openai_error(_post(limited_server, "/v1/completions", big), 413)

    def chunks():  # no Content-Length: the limit applies while the body streams in
        yield b'{"prompt": "'
        for _ in range(300):
            yield b"a " * 2048
        yield b'"}'

    r = httpx.post(limited_server.url("/v1/completions"), content=chunks(),
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert_openai_error(r, 413)
    assert_still_serving(limited_server)


def test_prompt_too_long_by_its_bytes_is_refused_before_tokenizing(limited_server):
    r = _post(limited_server, "/v1/completions", {"prompt": "once upon a time " * 50_000})  # 850 kB
    err = assert_openai_error(r, 400, "prompt")
    assert err["code"] == "context_length_exceeded"
    assert r.elapsed.total_seconds() < 2, r.elapsed


def test_byte_check_is_per_prompt_not_per_request(limited_server):
    """Many short prompts in one request: together far past one context's bytes, each well inside it."""
    prompts = ["Once upon a time there was a little dog " * 5] * 100  # 200 B each, 20 kB in all
    r = _post(limited_server, "/v1/completions", {"model": SERVED_NAME, "prompt": prompts, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 100


def _health_latencies(srv: RemoteServer, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=10) as c:
        while not stop.is_set():
            t = time.perf_counter()
            c.get(srv.url("/health"))
            out.append(time.perf_counter() - t)
            time.sleep(0.01)


def test_slow_request_template_is_stopped_and_health_stays_fast(limited_server):
    slow = ("{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
            "{{ messages[0]['content'] }}")
    stop, latencies = threading.Event(), []
    watcher = threading.Thread(target=_health_latencies, args=(limited_server, stop, latencies))
    watcher.start()
    try:
        t = time.perf_counter()
        r = _post(limited_server, "/v1/chat/completions", {"messages": USER, "chat_template": slow})
        took = time.perf_counter() - t
    finally:
        stop.set()
        watcher.join()
    err = assert_openai_error(r, 400, "chat_template")
    assert err["code"] == "chat_template_timeout"
    assert took < 30, took
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    assert len(latencies) > 20 and p99 < 0.1, f"/health p99 {p99:.3f}s (max {latencies[-1]:.3f}s)"
    # A quick trusted template still works.
    ok = _post(limited_server, "/v1/chat/completions", {"model": SERVED_NAME, "messages": USER, "max_tokens": 2,
                                                       "chat_template": "{{ messages[0]['content'] }} says:"})
    assert ok.status_code == 200, ok.text


# -- 503s carry Retry-After ----------------------------------------------------------------------------
def test_503_carries_retry_after():
    from freight.engine.async_llm import EngineOverloadedError, EngineShutdownError
    from freight.engine.core_client import EngineDeadError
    from freight.entrypoints.openai.serving_engine import engine_error

    for e in (EngineOverloadedError("busy"), EngineShutdownError("draining"), EngineDeadError("gone")):
        resp = engine_error(e).response()
        assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1


def test_engine_errors_do_not_leak_exception_text():
    from freight.engine.async_llm import EngineStepError
    from freight.entrypoints.openai.serving_engine import engine_error

    body = engine_error(EngineStepError("the engine failed: KeyError: secret/internal/path")).body().model_dump()
    assert "secret" not in json.dumps(body) and body["error"]["code"] == "engine_error"
    body = engine_error(RuntimeError("boom at /srv/internal.py:12")).body().model_dump()
    assert "internal" not in json.dumps(body)


# -- fault isolation in the step ----------------------------------------------------------------------
POISON_BIAS_TOKEN = 37  # a logit_bias on this token makes building the sampling tensors raise (injected)
PROMPTS = ["Once upon a time", "The dog", "Lily went to the park", "A bird sang"]


@pytest.fixture
def poisoned_sampling(monkeypatch):
    """Sampling tensors raise for any batch holding a request with logit_bias on POISON_BIAS_TOKEN."""
    from freight.worker import sampling_tensors

    real = sampling_tensors._logit_bias

    def poisoned(reqs, vocab_size, device):
        if any(POISON_BIAS_TOKEN in (r.sampling_params.logit_bias or {}) for r in reqs):
            raise RuntimeError("injected sampling failure")
        return real(reqs, vocab_size, device)

    monkeypatch.setattr(sampling_tensors, "_logit_bias", poisoned)


@pytest.fixture
def poisoned_preparation(monkeypatch):
    """Preparing a request whose prompt starts with token 5 raises in the runner (injected)."""
    from freight.worker.input_batch import InputBatch

    real = InputBatch._new_state

    def poisoned(self, new):
        if new.prompt_token_ids[:1] == [5]:
            raise ValueError("injected preparation failure")
        return real(self, new)

    monkeypatch.setattr(InputBatch, "_new_state", poisoned)


def _greedy(max_tokens=24, **kw):
    from freight import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


@pytest.mark.parametrize("poison", ["poisoned_sampling", "poisoned_preparation"])
def test_poisoned_request_fails_alone_offline(stories_dir, make_llm, request, poison):
    llm = make_llm(stories_dir, kv_cache_memory="16MiB")
    clean = [o.outputs[0].text for o in llm.generate(PROMPTS, _greedy(), use_tqdm=False)]
    request.getfixturevalue(poison)
    bad = ({"prompt_token_ids": [5, 6, 7]} if poison == "poisoned_preparation" else "Once")
    params = [_greedy()] * len(PROMPTS) + [_greedy(logit_bias={POISON_BIAS_TOKEN: 1.0})
                                           if poison == "poisoned_sampling" else _greedy()]
    outs = llm.generate([*PROMPTS, bad], params, use_tqdm=False)
    assert [o.outputs[0].text for o in outs[:-1]] == clean
    assert outs[-1].outputs[0].finish_reason == "error"
    s = llm.llm_engine.get_stats()
    assert s.num_running == 0 and s.num_free_blocks == s.num_total_blocks


def test_poisoned_request_fails_alone_served(stories_dir, poisoned_sampling):
    """In the server's frontend (engine core on a thread, so the fault can be injected): the poisoned
    request gets EngineStepError, the others in the same steps stream exactly their clean text."""
    from freight.config import EngineConfig
    from freight.engine.async_llm import AsyncLLM, EngineStepError

    llm = AsyncLLM(EngineConfig(model=str(stories_dir), dtype="float32", device="cpu", kv_cache_memory="16MiB",
                                num_threads=1), multiprocess=False, log_stats_interval=0)
    try:
        async def one(rid, prompt, params):
            try:
                return [o async for o in llm.generate(prompt, params, rid)][-1].outputs[0].text
            except EngineStepError as e:
                return e

        async def run(tag, poison):
            jobs = [one(f"{tag}{i}", p, _greedy()) for i, p in enumerate(PROMPTS)]
            if poison:
                jobs.insert(2, one(f"{tag}-poison", "Once", _greedy(logit_bias={POISON_BIAS_TOKEN: 1.0})))
            return await asyncio.gather(*jobs)

        clean = asyncio.run(run("clean", False))
        mixed = asyncio.run(run("mixed", True))
        assert isinstance(mixed[2], EngineStepError) and "injected sampling failure" in str(mixed[2])
        assert mixed[:2] + mixed[3:] == clean
        assert llm.is_healthy
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and llm.get_stats().num_free_blocks != llm.get_stats().num_total_blocks:
            time.sleep(0.02)
        s = llm.get_stats()
        assert s.num_running == 0 and s.num_free_blocks == s.num_total_blocks
    finally:
        llm.shutdown()
