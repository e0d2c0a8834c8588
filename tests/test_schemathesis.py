"""Schemathesis over the server's own OpenAPI document (/openapi.json), against a live server:
for every operation a bounded, derandomized set of generated requests, none of which may
get a 5xx, and every 4xx must be in OpenAI's error shape {"error": {message, type, param, code}}.

Three kinds of cases:
- "positive": requests that match the schema (most still get a 400: the schema cannot say
  that `model` must be a served name, that `n` is at most 128, which extra fields are known...);
- "negative": requests that break the schema (wrong types, missing fields, ...);
- "valid-core" (POST bodies only): positive cases with a known-good core put back in (a real
  prompt or message list, no `model`), so that the other generated fields (n, max_tokens,
  temperature, logprobs, stop, stream, echo, logit_bias, seed, extra fields ...) get past the
  first checks and reach sampling-parameter validation and the engine.

The server runs with a 96-token context so that any generated request finishes quickly
(chat's max_tokens defaults to "the rest of the context", and n goes up to 128). Nothing is
excluded: the streaming operations end by themselves (bounded by the context).
On a failure Hypothesis shrinks to a small case and the message has a curl command for it.
"""

from __future__ import annotations


import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from server_utils import chat_model_dir, clean_server, metric, wait_for_idle  # noqa: F401

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

MAX_EXAMPLES = {"positive": 40, "negative": 40, "valid-core": 100}
# Every operation in the schema (test_operations_are_all_listed keeps this in step with it);
# True where the request has parameters or a body, i.e. where negative cases exist.
OPERATIONS = {
    ("GET", "/health"): False, ("GET", "/ping"): False, ("POST", "/ping"): False, ("GET", "/version"): False,
    ("GET", "/metrics"): False, ("GET", "/v1/models"): False, ("POST", "/tokenize"): True,
    ("POST", "/detokenize"): True, ("POST", "/v1/completions"): True, ("POST", "/v1/chat/completions"): True,
    ("POST", "/v1/embeddings"): True, ("POST", "/reset_prefix_cache"): False,
}
USER = [{"role": "user", "content": "Once upon a time"}]
# valid-core: (fields set, fields removed) choices per operation.
CORES = {
    "/v1/completions": [({"prompt": "Once upon a time"}, ("model",)), ({"prompt": [1, 400, 30]}, ("model",))],
    "/v1/chat/completions": [({"messages": USER}, ("model",))],
    "/tokenize": [({"prompt": "Once upon a time"}, ("model", "messages")), ({"messages": USER}, ("model", "prompt"))],
    "/detokenize": [({"tokens": [1, 400, 30]}, ("model",))],
    "/v1/embeddings": [({"input": "Once upon a time"}, ("model", "dimensions")), ({"input": [1, 400, 30]}, ("model",))],
}
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def api(chat_model_dir, tmp_path_factory):  # noqa: F811
    with clean_server(chat_model_dir, ["--disable-log-requests", "--disable-uvicorn-access-log", "--max-model-len",
                                       "96"], tmp_path_factory.mktemp("schemathesis") / "server.log") as srv:
        yield srv


@pytest.fixture(autouse=True)
def subnormal_floats():
    """Once freight's C kernels are loaded in this process (earlier tests ran models), the CPU flushes
    subnormal floats to zero, and hypothesis refuses to generate floats then; turn that off meanwhile."""
    import numpy as np
    import torch

    flushing = np.float32(1e-40) * np.float32(1.0) == 0.0
    torch.set_flush_denormal(False)
    yield
    if flushing:
        torch.set_flush_denormal(True)


@pytest.fixture(scope="module")
def schema(api):
    return schemathesis.openapi.from_url(api.url("/openapi.json"))


def operation(schema, method: str, path: str):
    for result in schema.get_all_operations():
        op = result.ok()
        if op.method.upper() == method and op.path == path:
            return op
    raise AssertionError(f"{method} {path} is not in the OpenAPI document")


def repro(case, response, base_url: str) -> str:
    return (f"{case.method} {case.path} -> HTTP {response.status_code}\n{case.as_curl_command(base_url=base_url)}\n"
            f"response: {response.text[:1000]}")


def check_response(case, response, base_url: str) -> None:
    status = response.status_code
    assert status < 500, "server error:\n" + repro(case, response, base_url)
    if 400 <= status < 500:
        try:
            body = response.json()
        except ValueError:
            raise AssertionError("a 4xx that is not JSON:\n" + repro(case, response, base_url)) from None
        ok = (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)
              and set(body["error"]) == ERROR_KEYS and isinstance(body["error"]["message"], str)
              and body["error"]["message"] and isinstance(body["error"]["type"], str))
        assert ok, "a 4xx not in OpenAI's error shape:\n" + repro(case, response, base_url)


def run_cases(api, op, mode: str) -> None:
    generation_mode = GenerationMode.NEGATIVE if mode == "negative" else GenerationMode.POSITIVE
    cores = st.sampled_from(CORES[op.path]) if mode == "valid-core" else st.none()

    @given(case=op.as_strategy(generation_mode=generation_mode), core=cores)
    @settings(max_examples=MAX_EXAMPLES[mode], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink],
              print_blob=False)
    def call(case, core):
        if core is not None and isinstance(case.body, dict):
            fields, dropped = core
            for k in dropped:
                case.body.pop(k, None)
            case.body.update(fields)
        check_response(case, case.call(base_url=api.base_url, timeout=120), api.base_url)

    call()


def test_operations_are_all_listed(schema):
    ops = {(r.ok().method.upper(), r.ok().path) for r in schema.get_all_operations()}
    assert ops == set(OPERATIONS), "OPERATIONS is out of step with /openapi.json"


CASES = [pytest.param(m, p, mode, id=f"{m} {p} {mode}") for (m, p), has_input in OPERATIONS.items()
         for mode in (["positive", "negative"] + (["valid-core"] if p in CORES else []) if has_input
                      else ["positive"])]


@pytest.mark.parametrize("method, path, mode", CASES)
def test_no_server_errors(api, schema, method, path, mode):
    run_cases(api, operation(schema, method, path), mode)


def test_still_serving_and_idle_after(api):
    r = httpx.post(api.url("/v1/completions"), json={"prompt": "Once upon a time", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
    m = wait_for_idle(api, timeout=30)
    assert metric(m, "vllm:num_requests_running") == 0 and metric(m, "vllm:num_requests_waiting") == 0
    assert metric(m, "freight:kv_cache_free_blocks") == metric(m, "freight:kv_cache_total_blocks")
    assert "Traceback" not in api.log_path.read_text(errors="replace"), api.log_tail()
