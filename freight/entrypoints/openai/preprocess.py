"""Prompt preparation off the event loop: tokenization and chat templates, with limits.

Everything here runs on one worker thread of its own (the tokenizer is not meant to be
shared between threads), so the event loop keeps answering (/health, streams) while a
large prompt is tokenized or a template rendered. Before that, a cheap check refuses a
prompt whose byte length alone proves it cannot fit the context: no token covers more
than the longest vocabulary entry (in UTF-8 bytes), so a text of N bytes has at least
N / that many tokens. A chat template sent with the request is refused unless the server
trusts request templates (--trust-request-chat-template, as vLLM), and then its
rendering is stopped after a time limit.
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, TypeVar

from freight.entrypoints.openai.errors import bad_request

T = TypeVar("T")
RENDER_TIME_LIMIT_S = 5.0
# Normalizers may drop characters (control characters, some compatibility forms), so the
# byte bound gets a safety margin before it refuses anything.
_MARGIN = 2


class RenderTimeout(Exception):
    pass


def call_with_time_limit(fn: Callable[[], T], seconds: float) -> T:
    """fn() on this thread, raising RenderTimeout once it runs longer than seconds.

    A trace function checks the clock on every line of Python executed (Jinja templates
    compile to Python), so even an endless template loop is stopped; it slows only this call.
    """
    deadline = time.monotonic() + seconds
    events = 0

    def tracer(frame, event, arg):
        nonlocal events
        events += 1
        if events % 2000 == 0:
            time.sleep(0)  # hand the GIL to the event loop now and then: /health stays prompt
        if time.monotonic() > deadline:
            raise RenderTimeout(f"took longer than {seconds:g}s")
        return tracer

    sys.settrace(tracer)
    try:
        return fn()
    finally:
        sys.settrace(None)


def max_token_bytes(tokenizer) -> int:
    """The UTF-8 length of the longest vocabulary entry (an upper bound on the bytes one token covers)."""
    return max((len(t.encode("utf-8", "replace")) for t in tokenizer.get_vocab()), default=1) or 1


class PromptPreparer:
    def __init__(self, tokenizer, max_model_len: int, trust_request_chat_template: bool = False,
                 render_time_limit: float = RENDER_TIME_LIMIT_S, chat_template: Optional[str] = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template  # the server's (--chat-template), trusted as the model's own is
        self.max_model_len = max_model_len
        self.trust_request_chat_template = trust_request_chat_template
        self.render_time_limit = render_time_limit
        self.max_prompt_bytes = _MARGIN * max_token_bytes(tokenizer) * max_model_len
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="freight-tokenizer")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def check_length(self, texts: list[str], param: str) -> None:
        size = sum(len(t.encode("utf-8", "replace")) for t in texts)
        if size > self.max_prompt_bytes:
            raise bad_request(f"This model's maximum context length is {self.max_model_len} tokens; your {param} "
                              f"is {size} bytes long, more than that many tokens can hold. Please shorten it.",
                              param=param, code="context_length_exceeded")

    async def tokenize(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        self.check_length([text], param)
        return await self.run(lambda: self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    async def render(self, render_chat: Callable[..., tuple[str, list[int]]], messages: list[dict[str, str]],
                     chat_template: Optional[str], **kwargs: Any) -> tuple[str, list[int]]:
        """render_chat(tokenizer, messages, chat_template, **kwargs) on the tokenizer thread, with limits."""
        self.check_length([m["content"] for m in messages], "messages")
        if chat_template is not None and not self.trust_request_chat_template:
            raise bad_request("This server does not accept a 'chat_template' in requests (start it with "
                              "--trust-request-chat-template to allow them).", param="chat_template",
                              code="chat_template_not_allowed")

        def work() -> tuple[str, list[int]]:
            template = chat_template if chat_template is not None else self.chat_template
            call = lambda: render_chat(self.tokenizer, messages, template, **kwargs)  # noqa: E731
            if chat_template is None:
                return call()  # the model's own template (or the server's) is trusted
            try:
                return call_with_time_limit(call, self.render_time_limit)
            except RenderTimeout as e:
                raise bad_request(f"The request's chat template {e} to render and was stopped.",
                                  param="chat_template", code="chat_template_timeout") from None

        return await self.run(work)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
