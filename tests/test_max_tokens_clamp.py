"""--clamp-max-tokens: prompt + max_tokens over max_model_len is lowered, not refused.

Without the flag such a request is a 400 (context_length_exceeded), as in vLLM; with it
the completion runs until the context is full (finish_reason "length"). A prompt that
alone fills the context is a 400 either way.
"""

from __future__ import annotations

import httpx
import pytest

from server_utils import clean_server, make_chat_model_dir

MAX_MODEL_LEN = 64
PROMPT = "Once upon a time, there was a little girl named Lily."


@pytest.fixture(scope="module")
def chat_model(stories_dir, tmp_path_factory):
    return make_chat_model_dir(stories_dir, tmp_path_factory.mktemp("clamp") / "stories-chat")


def _post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url(path), json=body, timeout=120)


@pytest.mark.parametrize("clamp", [False, True], ids=["refuse", "clamp"])
def test_max_tokens_over_the_context(chat_model, tmp_path, clamp):
    flags = ["--max-model-len", str(MAX_MODEL_LEN)] + (["--clamp-max-tokens"] if clamp else [])
    with clean_server(chat_model, flags, tmp_path / "server.log") as srv:
        body = {"prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
        r = _post(srv, "/v1/completions", body)
        chat = _post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}],
                                                   "max_tokens": 1000, "ignore_eos": True})
        too_long = _post(srv, "/v1/completions", {"prompt": PROMPT * 8, "max_tokens": 1})
        fits = _post(srv, "/v1/completions", dict(body, max_tokens=5))
    for resp in (r, chat):
        if clamp:
            assert resp.status_code == 200, resp.text
            choice, use = resp.json()["choices"][0], resp.json()["usage"]
            assert choice["finish_reason"] == "length"
            assert use["prompt_tokens"] + use["completion_tokens"] == MAX_MODEL_LEN
        else:
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["code"] == "context_length_exceeded"
            assert resp.json()["error"]["param"] == "max_tokens"
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == 5
