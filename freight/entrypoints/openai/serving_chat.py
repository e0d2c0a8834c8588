"""POST /v1/chat/completions: messages -> the model's chat template -> a completion.

Streams follow OpenAI's order: a chunk with the assistant role per choice, content
deltas, a chunk with the finish reason, the usage chunk (choices []) when asked.
Tools, tool_choice and response_format become an output constraint (structured
outputs) and a per-choice ChoiceParser (reasoning, tool calls), see chat_reply.py.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Optional

import jinja2
from fastapi import Request
from starlette.responses import Response

from freight.engine.request_stream import RequestStream
from freight.entrypoints.openai.chat_reply import ChatParsers, ChoiceParser, merge_deltas
from freight.entrypoints.openai.errors import APIError, bad_request
from freight.entrypoints.openai.logprobs import TokenStrings, chat_logprobs
from freight.entrypoints.openai.protocol import (ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse,
                                                 ChatCompletionStreamChoice, ChatCompletionStreamResponse,
                                                 ChatLogProbs, ChatMessage, DeltaMessage, RequestTimeline, usage)
from freight.entrypoints.openai.serving_engine import (MAX_LOGPROBS, SSE_DONE, OpenAIServing, SSEResponse,
                                                       check_common, extra_values, final_outputs, random_id,
                                                       request_timeline, sse, sse_error, to_sampling_params,
                                                       until_disconnect)
from freight.entrypoints.openai.structured import constraint_errors_named, take_constraint
from freight.entrypoints.openai.tool_calls import ToolPlan, plan_tools, template_messages_tool_calls
from freight.sampling_params import SamplingParams

_ROLES = ("system", "developer", "user", "assistant", "tool")
_UNSUPPORTED_PARTS = {"image_url", "input_audio", "file", "image", "audio", "video", "video_url"}
_RESERVED_TEMPLATE_KWARGS = {"conversation", "messages", "tokenize", "chat_template", "add_generation_prompt",
                             "continue_final_message", "return_dict", "return_tensors", "tools"}


def _content_text(content: Any, where: str, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        if role == "assistant":
            return ""
        if role == "tool":
            return ""
        raise bad_request(f"Missing required parameter: '{where}.content'.", param=f"{where}.content",
                          code="missing_required_parameter")
    if not isinstance(content, list):
        raise bad_request(f"Invalid type for '{where}.content': expected a string or an array of content parts.",
                          param=f"{where}.content", code="invalid_type")
    texts = []
    for j, part in enumerate(content):
        p = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _UNSUPPORTED_PARTS:
            raise bad_request(f"'{p}': content of type '{kind}' is not supported; this model takes text only.",
                              param=p, code="unsupported_content")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"Invalid value for '{p}': expected {{\"type\": \"text\", \"text\": <string>}}.",
                              param=p, code="invalid_value")
        texts.append(part["text"])
    return "\n".join(texts)


def parse_messages(messages: Any) -> list[dict[str, Any]]:
    """Check messages as OpenAI does and reduce them to {role, content[, name, tool_calls, tool_call_id]}."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array of messages.", param="messages",
                          code="invalid_value")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"Invalid type for '{where}': expected an object with 'role' and 'content'.",
                              param=where, code="invalid_type")
        role = m.get("role")
        if role is None:
            raise bad_request(f"Missing required parameter: '{where}.role'.", param=f"{where}.role",
                              code="missing_required_parameter")
        if role == "function" or m.get("function_call"):
            raise bad_request(f"'{where}': the legacy function messages are not supported; use tools.",
                              param=where, code="unsupported_parameter")
        if role not in _ROLES:
            raise bad_request(f"Invalid value for '{where}.role': {role!r}. Supported values are: 'system', "
                              "'developer', 'user', 'assistant' and 'tool'.", param=f"{where}.role",
                              code="invalid_value")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": _content_text(m.get("content"), where, role)}
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise bad_request(f"'{where}.tool_calls' is only allowed on assistant messages.",
                                  param=f"{where}.tool_calls", code="invalid_value")
            msg["tool_calls"] = template_messages_tool_calls(m["tool_calls"], where)
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise bad_request(f"Missing required parameter: '{where}.tool_call_id'.",
                                  param=f"{where}.tool_call_id", code="missing_required_parameter")
            msg["tool_call_id"] = m["tool_call_id"]
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise bad_request(f"Invalid type for '{where}.name': expected a string.", param=f"{where}.name",
                                  code="invalid_type")
            msg["name"] = m["name"]
        out.append(msg)
    return out


def render_chat(tokenizer, messages: list[dict[str, Any]], chat_template: Optional[str] = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                template_kwargs: Optional[dict[str, Any]] = None, add_special_tokens: bool = False,
                tools: Optional[list[dict[str, Any]]] = None) -> tuple[str, list[int]]:
    """The prompt text and token ids of a conversation (as LLM.chat builds them)."""
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise bad_request("This model has no chat template, so it cannot serve chat requests; use /v1/completions "
                          "or pass a 'chat_template'.", param="messages", code="no_chat_template")
    if add_generation_prompt and continue_final_message:
        raise bad_request("'add_generation_prompt' and 'continue_final_message' cannot both be true.",
                          param="continue_final_message")
    if continue_final_message and messages[-1]["role"] != "assistant":
        raise bad_request("'continue_final_message' needs the last message to be from the assistant.",
                          param="continue_final_message")
    kwargs = dict(template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(kwargs))
    if reserved:
        raise bad_request(f"'chat_template_kwargs' must not set {', '.join(reserved)}.", param="chat_template_kwargs")
    if tools:
        kwargs["tools"] = tools
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        raise bad_request(f"The chat template could not be applied to these messages: {e}", param="messages",
                          code="invalid_messages") from None
    # The template already holds any BOS token: tokenize without adding specials again.
    return text, tokenizer(text, add_special_tokens=add_special_tokens).input_ids


class OpenAIServingChat(OpenAIServing):
    def __init__(self, *args, parsers: Optional[ChatParsers] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.parsers = parsers or ChatParsers()

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        self._check_unsupported(req)
        if req.stream_options is not None and not req.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
        messages = parse_messages(req.messages)
        plan = plan_tools(req.tools, req.tool_choice,
                          self.parsers.enable_auto_tool_choice and self.parsers.tool_parser is not None,
                          req.parallel_tool_calls)
        text, ids = await self.prep.render(render_chat, messages, req.chat_template,
                                           add_generation_prompt=req.add_generation_prompt,
                                           continue_final_message=req.continue_final_message,
                                           template_kwargs=req.chat_template_kwargs,
                                           add_special_tokens=req.add_special_tokens, tools=plan.tools or None)
        self.check_context(len(ids), None, "messages")
        request_id = random_id("chatcmpl")
        with constraint_errors_named(req):
            # Without a limit a chat reply may fill the rest of the context (OpenAI's and vLLM's default).
            params = self._sampling_params(req, plan, default_max_tokens=self.engine.max_model_len - len(ids))
            self.check_context(len(ids), params.max_tokens, "messages")
            streams = self.add_requests(request_id, [(text, ids)], params, prompt_param="messages",
                                        priority=req.priority)
        if req.stream:
            return SSEResponse(self._stream(req, plan, request_id, ids, params, streams[0]),
                               on_close=streams[0].abort)
        try:
            return await until_disconnect(raw, self._full(req, plan, request_id, ids, params, streams[0]))
        finally:
            streams[0].abort()

    @staticmethod
    def _check_unsupported(req: ChatCompletionRequest) -> None:
        def refuse(param: str, what: str) -> None:
            raise bad_request(f"'{param}': {what} is not supported by this server; use tools.", param=param,
                              code="unsupported_parameter")

        if req.functions:
            refuse("functions", "legacy function calling")
        if req.function_call not in (None, "none", "auto"):
            refuse("function_call", "legacy function calling")

    def _sampling_params(self, req: ChatCompletionRequest, plan: ToolPlan,
                         default_max_tokens: int) -> SamplingParams:
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:  # the rest of the context, or less if the generation config says so (as vLLM)
            max_tokens = min(default_max_tokens, self.default_sampling_params.get("max_tokens", default_max_tokens))
        values = dict(n=req.n, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                      temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop,
                      max_tokens=max_tokens, logit_bias=req.logit_bias)
        check_common(values)
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise bad_request("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(f"Invalid 'top_logprobs': expected a value in [0, {MAX_LOGPROBS}], got "
                                  f"{req.top_logprobs}.", param="top_logprobs", code="invalid_value")
        if req.logprobs:
            values["logprobs"] = req.top_logprobs or 0
        values.update(extra_values(req))
        take_constraint(values, req.response_format)
        if plan.forced:
            if "structured_outputs" in values:
                raise bad_request(f"tool_choice {plan.choice!r} constrains the output already; it cannot be "
                                  "combined with response_format or structured_outputs.", param="tool_choice")
            values["structured_outputs"] = plan.constraint()
        elif plan.choice == "auto" and self.parsers.tool_parser.keeps_special_tokens:
            values.setdefault("skip_special_tokens", False)  # its call marker is a special token
        try:
            return to_sampling_params(values, self.default_sampling_params)
        except APIError as e:
            if e.param == "max_tokens" and req.max_completion_tokens is not None:
                e.param = "max_completion_tokens"  # name the field the client sent
            raise

    def _logprobs(self, req: ChatCompletionRequest, strings: TokenStrings, token_ids: list[int],
                  lps: list) -> Optional[ChatLogProbs]:
        if not req.logprobs:
            return None
        return ChatLogProbs(content=chat_logprobs(strings, token_ids, lps, req.top_logprobs or 0))

    async def _full(self, req: ChatCompletionRequest, plan: ToolPlan, request_id: str, prompt_ids: list[int],
                    params: SamplingParams, stream: RequestStream) -> Response:
        out = (await final_outputs([stream]))[0]
        choices = []
        for c in out.outputs:
            strings = TokenStrings(self.tokenizer, prompt_ids, params.skip_special_tokens)
            parser = ChoiceParser(plan, self.parsers, self.tokenizer, req.chat_template_kwargs)
            reply = parser.full(c.text)
            choices.append(ChatCompletionChoice(
                index=c.index, message=ChatMessage(role="assistant", content=reply.content,
                                                   reasoning_content=reply.reasoning_content,
                                                   tool_calls=reply.tool_calls),
                logprobs=self._logprobs(req, strings, c.token_ids, c.logprobs or []),
                finish_reason=parser.finish_reason(c.finish_reason), stop_reason=c.stop_reason))
        resp = ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                      usage=usage(len(prompt_ids), sum(len(c.token_ids) for c in out.outputs),
                                                  out.num_cached_tokens),
                                      timeline=request_timeline([out]) if req.return_timeline else None)
        return Response(resp.model_dump_json(), media_type="application/json")

    async def _stream(self, req: ChatCompletionRequest, plan: ToolPlan, request_id: str, prompt_ids: list[int],
                      params: SamplingParams, stream: RequestStream) -> AsyncIterator[str]:
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        created = int(time.time())
        generated, cached, final = 0, 0, None

        def chunk(choices: list[ChatCompletionStreamChoice], with_usage: bool = False,
                  timeline: Optional[RequestTimeline] = None) -> str:
            return sse(ChatCompletionStreamResponse(
                id=request_id, created=created, model=self.model_name, choices=choices,
                usage=usage(len(prompt_ids), generated, cached) if with_usage else None, timeline=timeline))

        strings = [TokenStrings(self.tokenizer, prompt_ids, params.skip_special_tokens) for _ in range(params.n)]
        parsers = [ChoiceParser(plan, self.parsers, self.tokenizer, req.chat_template_kwargs) for _ in range(params.n)]
        done = [False] * params.n
        try:
            for i in range(params.n):
                yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))],
                            include_usage and continuous)
            async for out in stream:
                generated = sum(len(c.token_ids) for c in out.outputs)
                cached, final = out.num_cached_tokens, out
                for pos, c in enumerate(out.outputs):
                    if done[c.index]:
                        continue
                    text, new_ids = out.delta_text[pos], out.delta_token_ids[pos]
                    parser = parsers[c.index]
                    done[c.index] = c.finish_reason is not None
                    delta = parser.delta(text)
                    if done[c.index]:
                        delta = merge_deltas([delta, parser.finish()])
                    if delta is None and not new_ids and not done[c.index]:
                        continue
                    lps = (c.logprobs or [])[len(c.token_ids) - len(new_ids):]
                    yield chunk([ChatCompletionStreamChoice(
                        index=c.index, delta=delta or DeltaMessage(),
                        logprobs=self._logprobs(req, strings[c.index], new_ids, lps),
                        finish_reason=parser.finish_reason(c.finish_reason), stop_reason=c.stop_reason)],
                        include_usage and continuous)
            if include_usage or req.return_timeline:  # the last chunk: usage, and the timeline when asked
                yield chunk([], include_usage, request_timeline([final]) if req.return_timeline and final else None)
        except Exception as e:
            yield sse_error(e)
        finally:
            stream.abort()
        yield SSE_DONE

