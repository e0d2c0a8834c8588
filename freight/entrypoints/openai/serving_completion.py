"""POST /v1/completions: prompts (text or token ids, one or many) -> text completions."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from fastapi import Request
from starlette.responses import Response

from freight.entrypoints.openai.errors import bad_request
from freight.entrypoints.openai.logprobs import TokenStrings, completion_logprobs
from freight.entrypoints.openai.protocol import (CompletionChoice, CompletionLogProbs, CompletionRequest,
                                                 CompletionResponse, usage)
from freight.entrypoints.openai.serving_engine import (MAX_LOGPROBS, MAX_N, MAX_PROMPTS, SSE_DONE, OpenAIServing,
                                                       SSEResponse, check_common, extra_values, final_outputs,
                                                       merge_streams, random_id, request_timeline, sse, sse_error,
                                                       to_sampling_params, until_disconnect)
from freight.engine.request_stream import RequestStream
from freight.outputs import CompletionOutput, RequestOutput
from freight.entrypoints.openai.structured import constraint_errors_named, take_constraint
from freight.sampling_params import SamplingParams

Prompt = tuple[Optional[str], list[int]]


def _concat(a: CompletionLogProbs, b: CompletionLogProbs) -> CompletionLogProbs:
    return CompletionLogProbs(text_offset=a.text_offset + b.text_offset, token_logprobs=a.token_logprobs +
                              b.token_logprobs, tokens=a.tokens + b.tokens, top_logprobs=a.top_logprobs +
                              b.top_logprobs)


@dataclass
class _StreamedChoice:
    strings: Optional[TokenStrings]
    offset: int = 0
    started: bool = False
    done: bool = False


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        if req.suffix:
            raise bad_request("'suffix' is not supported by this server.", param="suffix",
                              code="unsupported_parameter")
        if req.stream_options is not None and not req.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
        with constraint_errors_named(req):
            params = self._sampling_params(req)
        prompts = await self._prompts(req)
        for _, ids in prompts:
            self.check_context(len(ids), params.max_tokens)
        request_id = random_id("cmpl")
        with constraint_errors_named(req):
            streams = self.add_requests(request_id, prompts, params, priority=req.priority)
        if req.stream:
            return SSEResponse(self._stream(req, request_id, prompts, params, streams),
                               on_close=lambda: [s.abort() for s in streams])
        try:
            return await until_disconnect(raw, self._full(req, request_id, prompts, params, streams))
        finally:
            for s in streams:  # no-op when they finished; frees them when the client hung up
                s.abort()

    def _sampling_params(self, req: CompletionRequest) -> SamplingParams:
        values = dict(n=req.n, best_of=req.best_of, presence_penalty=req.presence_penalty,
                      frequency_penalty=req.frequency_penalty, temperature=req.temperature, top_p=req.top_p,
                      seed=req.seed, stop=req.stop, max_tokens=req.max_tokens, logprobs=req.logprobs,
                      logit_bias=req.logit_bias)
        check_common(values)
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise bad_request(f"Invalid 'logprobs': expected a value in [0, {MAX_LOGPROBS}], got {req.logprobs}.",
                              param="logprobs", code="invalid_value")
        extras = extra_values(req)
        if req.echo and req.logprobs is not None and "prompt_logprobs" not in extras:
            values["prompt_logprobs"] = req.logprobs
        values.update(extras)
        take_constraint(values, req.response_format)
        return to_sampling_params(values, self.default_sampling_params)

    async def _prompts(self, req: CompletionRequest) -> list[Prompt]:
        p = req.prompt
        if isinstance(p, str):
            items: list = [p]
        elif not p:
            raise bad_request("'prompt' must not be empty.", param="prompt")
        elif isinstance(p[0], int):
            items = [p]
        else:
            items = list(p)
        if len(items) > MAX_PROMPTS:
            raise bad_request(f"Too many prompts: {len(items)}; at most {MAX_PROMPTS} in one request.",
                              param="prompt", code="too_many_prompts")
        if len(items) * req.n > MAX_N:
            raise bad_request(f"{len(items)} prompts with n={req.n} ask for {len(items) * req.n} completions; at "
                              f"most {MAX_N} in one request.", param="n", code="invalid_value")
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append((item, await self.prep.tokenize(item, req.add_special_tokens)))
            elif not item:
                raise bad_request("'prompt' must not contain an empty list of token ids.", param="prompt")
            else:
                prompts.append((None, list(item)))
        return prompts

    def _prompt_text(self, prompt: Prompt) -> str:
        text, ids = prompt
        return text if text is not None else self.tokenizer.decode(ids)

    def _echo_logprobs(self, prompt: Prompt, out: RequestOutput) -> CompletionLogProbs:
        ids = prompt[1]
        lps = out.prompt_logprobs or [None] * len(ids)
        return completion_logprobs(TokenStrings(self.tokenizer, []), ids, lps, 0)

    # -- non-streaming --------------------------------------------------------------
    async def _full(self, req: CompletionRequest, request_id: str, prompts: list[Prompt], params: SamplingParams,
                    streams: list[RequestStream]) -> Response:
        finals = await final_outputs(streams)
        choices, completion_tokens = [], 0
        for i, out in enumerate(finals):
            for c in out.outputs:
                choices.append(self._choice(req, i * params.n + c.index, prompts[i], params, out, c))
                completion_tokens += len(c.token_ids)
        resp = CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                  usage=usage(sum(len(ids) for _, ids in prompts), completion_tokens,
                                              sum(out.num_cached_tokens for out in finals)),
                                  timeline=request_timeline(finals) if req.return_timeline else None)
        return Response(resp.model_dump_json(), media_type="application/json")

    def _choice(self, req: CompletionRequest, index: int, prompt: Prompt, params: SamplingParams,
                out: RequestOutput, c: CompletionOutput) -> CompletionChoice:
        prompt_text = self._prompt_text(prompt) if req.echo else ""
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(TokenStrings(self.tokenizer, prompt[1], params.skip_special_tokens),
                                           c.token_ids, c.logprobs or [], len(prompt_text))
            if req.echo:
                logprobs = _concat(self._echo_logprobs(prompt, out), logprobs)
        return CompletionChoice(index=index, text=prompt_text + c.text, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                prompt_logprobs=out.prompt_logprobs if "prompt_logprobs" in extra_values(req)
                                else None)

    # -- streaming ---------------------------------------------------------------------
    async def _stream(self, req: CompletionRequest, request_id: str, prompts: list[Prompt],
                      params: SamplingParams, streams: list[RequestStream]) -> AsyncIterator[str]:
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        created = int(time.time())
        num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        generated, cached = [0] * len(prompts), [0] * len(prompts)
        finals: list[RequestOutput] = []
        states: dict[int, _StreamedChoice] = {}
        try:
            async for i, out in merge_streams(streams):
                generated[i] = sum(len(c.token_ids) for c in out.outputs)
                cached[i] = out.num_cached_tokens
                if out.finished:
                    finals.append(out)
                for pos, c in enumerate(out.outputs):
                    index = i * params.n + c.index
                    st = states.get(index)
                    if st is None:
                        strings = (TokenStrings(self.tokenizer, prompts[i][1], params.skip_special_tokens)
                                   if req.logprobs is not None else None)
                        st = states[index] = _StreamedChoice(strings)
                    if st.done:
                        continue
                    text, new_ids = out.delta_text[pos], out.delta_token_ids[pos]
                    logprobs = None
                    if not st.started and req.echo:
                        prompt_text = self._prompt_text(prompts[i])
                        text = prompt_text + text
                        st.offset = len(prompt_text)
                        if req.logprobs is not None:
                            logprobs = self._echo_logprobs(prompts[i], out)
                    if req.logprobs is not None:
                        lps = (c.logprobs or [])[len(c.token_ids) - len(new_ids):]
                        gen = completion_logprobs(st.strings, new_ids, lps, st.offset)
                        st.offset += sum(len(t) for t in gen.tokens)
                        logprobs = gen if logprobs is None else _concat(logprobs, gen)
                    st.done = c.finish_reason is not None
                    if not text and not new_ids and not st.done and st.started:
                        continue
                    st.started = True
                    chunk = CompletionResponse(
                        id=request_id, created=created, model=self.model_name,
                        choices=[CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason)],
                        usage=usage(num_prompt_tokens, sum(generated), sum(cached)) if include_usage and continuous
                        else None)
                    yield sse(chunk)
            if include_usage or req.return_timeline:  # the last chunk: usage, and the timeline when asked
                yield sse(CompletionResponse(
                    id=request_id, created=created, model=self.model_name, choices=[],
                    usage=usage(num_prompt_tokens, sum(generated), sum(cached)) if include_usage else None,
                    timeline=request_timeline(finals) if req.return_timeline else None))
        except Exception as e:
            yield sse_error(e)
        finally:
            for s in streams:
                s.abort()
        yield SSE_DONE
