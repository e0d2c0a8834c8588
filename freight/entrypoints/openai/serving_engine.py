"""What the OpenAI endpoints share: model checks, request -> SamplingParams, queueing
requests on the AsyncLLM with errors mapped to HTTP statuses, and SSE streaming."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from freight.engine.async_llm import (AsyncLLM, EngineDeadError, EngineOverloadedError, EngineShutdownError,
                                      EngineStepError, RequestStream)
from freight.engine.llm_engine import PromptError
from freight.entrypoints.openai.errors import APIError, bad_request
from freight.entrypoints.openai.preprocess import PromptPreparer
from freight.entrypoints.openai.protocol import RequestTimeline
from freight.generation_defaults import apply_defaults
from freight.outputs import RequestOutput
from freight.sampling_params import SamplingParams, SamplingParamsError

logger = logging.getLogger(__name__)

MAX_N = 128           # OpenAI's limit on n
MAX_PROMPTS = 256     # prompts in one /v1/completions request
MAX_LOGPROBS = 20     # vLLM's default max_logprobs (OpenAI: 5 for completions, 20 for chat)

# Parameters that may be sent but do not change what is generated (end-user ids, storage
# and tier hints); accepted and ignored, as OpenAI-compatible servers do.
NO_EFFECT = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "request_id",
                       "cache_salt", "priority_hint"})
# Values of parameters that mean "feature off": accepted even when SamplingParams lacks the field.
_NEUTRAL: dict[str, Any] = {"n": 1, "best_of": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                            "repetition_penalty": 1.0, "min_p": 0.0, "min_tokens": 0, "logit_bias": {},
                            "use_beam_search": False, "stop": [], "ignore_eos": False}
# Known OpenAI/vLLM parameters freight does not implement: a 400 says so (others: "unrecognized").
_KNOWN_UNSUPPORTED = frozenset({
    "use_beam_search", "length_penalty", "early_stopping", "truncate_prompt_tokens", "allowed_token_ids",
    "bad_words", "logits_processors", "mm_processor_kwargs",
    "documents", "return_tokens_as_token_ids", "kv_transfer_params", "vllm_xargs", "prompt_embeds", "suffix",
    "tools", "tool_choice", "functions", "function_call", "audio", "modalities",
    "prediction", "reasoning_effort", "web_search_options", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "best_of", "logit_bias", "stop", "min_tokens", "n", "prompt_logprobs",
    "include_stop_str_in_output", "spaces_between_special_tokens", "echo"})


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_param_names() -> set[str]:
    # Read at call time: fields another part of freight adds to SamplingParams work here unchanged.
    return {f.name for f in dataclasses.fields(SamplingParams) if f.init}


def to_sampling_params(values: dict[str, Any], defaults: Optional[dict[str, Any]] = None) -> SamplingParams:
    """SamplingParams from request values (None = not given: the default applies).

    defaults (the model's generation config) fill what the request left unset; then
    SamplingParams' own. Every name SamplingParams accepts is passed through; anything
    else is a 400 that names the parameter, unless its value means "off".
    """
    apply_defaults(values, defaults or {})
    accepted = sampling_param_names()
    kwargs = {}
    for name, value in values.items():
        if value is None:
            continue
        if name in accepted:
            kwargs[name] = value
        elif name in _NEUTRAL and value == _NEUTRAL[name]:
            continue
        elif name in _KNOWN_UNSUPPORTED:
            raise bad_request(f"'{name}' is not supported by this server.", param=name, code="unsupported_parameter")
        else:
            raise bad_request(f"Unrecognized request argument supplied: {name}", param=name,
                              code="unrecognized_argument")
    try:
        return SamplingParams(**kwargs)
    except SamplingParamsError as e:
        raise bad_request(str(e), param=e.param) from None
    except (TypeError, ValueError) as e:
        raise bad_request(f"invalid sampling parameters: {e}") from None


def check_common(values: dict[str, Any]) -> None:
    """OpenAI's ranges that SamplingParams itself does not enforce."""
    t = values.get("temperature")
    if t is not None and not 0.0 <= t <= 2.0:
        raise bad_request(f"Invalid 'temperature': expected a value in [0, 2], got {t}.", param="temperature",
                          code="invalid_value")
    n = values.get("n")
    if n is not None and not 1 <= n <= MAX_N:
        raise bad_request(f"Invalid 'n': expected a value in [1, {MAX_N}], got {n}.", param="n",
                          code="invalid_value")
    bias = values.get("logit_bias")
    if bias:
        try:
            values["logit_bias"] = {int(k): v for k, v in bias.items()}
        except ValueError:
            raise bad_request("logit_bias keys must be token ids (integers as strings).", param="logit_bias",
                              code="invalid_value") from None


def extra_values(request: BaseModel) -> dict[str, Any]:
    """The request's extra (non-OpenAI) fields, minus those that change nothing."""
    return {k: v for k, v in (request.model_extra or {}).items() if k not in NO_EFFECT}


def engine_error(e: BaseException, prompt_param: str = "prompt") -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, PromptError):
        return bad_request(str(e), param=prompt_param, code="invalid_prompt")
    if isinstance(e, SamplingParamsError):
        return bad_request(str(e), param=e.param)
    if isinstance(e, EngineOverloadedError):
        return APIError(str(e), 503, code="server_overloaded")
    if isinstance(e, (EngineShutdownError, EngineDeadError)):
        return APIError(str(e), 503, code="service_unavailable")
    if isinstance(e, EngineStepError):  # the exception's text is in the server log, not for clients
        return APIError("The engine failed while running this request; the server log has the details.", 500,
                        code="engine_error")
    if isinstance(e, ValueError):
        return bad_request(str(e))
    logger.error("unexpected error while serving a request", exc_info=e)
    return APIError("Internal server error; the server log has the details.", 500)


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, served_model_names: list[str], prep: PromptPreparer):
        self.engine = engine
        self.served_model_names = served_model_names
        self.prep = prep
        self.tokenizer = engine.tokenizer  # the event loop's own: small decodes (logprob strings) only
        # The model's generation config: what a request gets for the sampling fields it leaves unset.
        self.default_sampling_params: dict[str, Any] = engine.processor.default_sampling_params

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model not in self.served_model_names:
            raise APIError(f"The model `{model}` does not exist.", 404, param="model", code="model_not_found")

    def check_context(self, num_prompt_tokens: int, max_tokens: Optional[int], what: str = "prompt") -> None:
        limit = self.engine.max_model_len
        if num_prompt_tokens >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your {what} is "
                              f"{num_prompt_tokens} tokens long, which leaves no room for a completion. Please "
                              f"reduce the length of the {what}.", param=what, code="context_length_exceeded")
        clamped = self.engine.config.clamp_max_tokens  # then the engine stops the sequence at the limit
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit and not clamped:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {what}, "
                              f"{max_tokens} in the completion). Please reduce the length of the {what} or "
                              "completion.", param="max_tokens", code="context_length_exceeded")

    def add_requests(self, request_id: str, prompts: list[tuple[Optional[str], list[int]]],
                     params: SamplingParams, prompt_param: str = "prompt", priority: int = 0) -> list[RequestStream]:
        """Queue one engine request per prompt; all or none (a failure aborts those already queued)."""
        streams: list[RequestStream] = []
        try:
            for i, (text, ids) in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(self.engine.add_request(rid, {"prompt": text, "prompt_token_ids": ids}, params,
                                                       priority=priority))
        except Exception as e:
            for s in streams:
                s.abort()
            raise engine_error(e, prompt_param) from None
        return streams


# -- streaming helpers -----------------------------------------------------------------
SSE_DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def sse_error(e: BaseException) -> str:
    """An error after the stream has started: OpenAI's SDK raises it from the event's "error" key."""
    return sse(engine_error(e).body())


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its generator when the stream ends.

    Starlette cancels the sending task when the client disconnects, but the generator
    may then be suspended at a `yield` (or not started at all) and would only be closed
    when garbage-collected; closing it here frees the engine requests right away.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Optional[Callable[[], Any]] = None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A generator that never started would not run its `finally` on aclose(): on_close
            # covers that case (a client gone before the first byte).
            if self._on_close is not None:
                self._on_close()
            with anyio.CancelScope(shield=True):
                await self._content.aclose()


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) pairs from several request streams as they arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    pending = {asyncio.ensure_future(s.get()): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: pending[t]):
                i = pending.pop(task)
                yield i, task.result()
                if not streams[i].finished:
                    pending[asyncio.ensure_future(streams[i].get())] = i
    finally:
        for task in pending:
            task.cancel()


async def final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    finals: list[Optional[RequestOutput]] = [None] * len(streams)
    try:
        async for i, out in merge_streams(streams):
            if out.finished:
                finals[i] = out
    except Exception as e:
        raise engine_error(e) from None
    finally:
        for s in streams:
            s.abort()
    return finals  # type: ignore[return-value]


def request_timeline(finals: list[RequestOutput]) -> Optional[RequestTimeline]:
    """The timeline of a response (return_timeline): its request's, or with several prompts the one
    that finished last (it bounds the response's latency)."""
    out = max(finals, key=lambda o: (o.metrics.finished_time or 0.0) if o.metrics else 0.0)
    m = out.metrics
    if m is None:
        return None
    to_unix = time.time() - time.monotonic()  # the engine's times are on the monotonic clock
    return RequestTimeline(arrival_time=m.arrival_time + to_unix, queue_time=m.queue_time,
                           prefill_time=m.prefill_time, decode_time=m.decode_time,
                           inference_time=m.inference_time, e2e_time=m.e2e_time,
                           num_preemptions=m.num_preemptions, num_cached_tokens=out.num_cached_tokens)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run a non-streaming handler, cancelling it (so its requests are aborted) if the client hangs up."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # its `finally` aborts the engine requests
    if not task.done() or task.cancelled():
        return JSONResponse({"error": {"message": "client disconnected", "type": "invalid_request_error",
                                       "param": None, "code": "client_disconnected"}}, status_code=499)
    return task.result()
