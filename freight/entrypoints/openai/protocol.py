"""Request and response bodies of the OpenAI-compatible API (pydantic).

Requests are validated strictly: a boolean must be a JSON boolean, an integer a JSON
integer (not true, not "5"), a string valid Unicode (no lone surrogates); each failure
is a 400 naming the field. Requests allow extra fields: vLLM's extensions (top_k,
min_tokens, ignore_eos, ...) arrive that way and are matched against SamplingParams at
request time (see serving_engine.to_sampling_params), which checks their types and
ranges too, so anything neither the server nor the engine understands is refused with a
400 naming it instead of being dropped silently.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator


class InvalidUnicodeError(ValueError):
    def __init__(self, param: str):
        super().__init__(f"'{param}' is not valid Unicode (it holds a lone surrogate)")
        self.param = param


def check_unicode(value: Any, path: str = "") -> None:
    """Raise InvalidUnicodeError naming the first string (or key) in value that UTF-8 cannot encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidUnicodeError(path or "body") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(k, path)
            check_unicode(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_unicode(v, f"{path}[{i}]")


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_unicode(data)
        return data


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors -------------------------------------------------------------------
class ErrorInfo(_Response):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(_Response):
    error: ErrorInfo


# -- shared -------------------------------------------------------------------
class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class PromptTokenUsageInfo(_Response):
    cached_tokens: Optional[int] = None  # prompt tokens found in the prefix cache (not computed again)


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokenUsageInfo] = None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: Optional[int] = None) -> UsageInfo:
    details = PromptTokenUsageInfo(cached_tokens=cached_tokens) if cached_tokens is not None else None
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)


class RequestTimeline(_Response):
    """freight's extension, sent when a request sets "return_timeline": true. Times in seconds;
    arrival_time is Unix time; a phase the request never reached (aborted) is null."""

    arrival_time: float
    queue_time: Optional[float] = None       # arrival -> first scheduled
    prefill_time: Optional[float] = None     # first scheduled -> first token
    decode_time: Optional[float] = None      # first token -> last token
    inference_time: Optional[float] = None   # first scheduled -> last token (prefill + decode)
    e2e_time: Optional[float] = None         # arrival -> finished
    num_preemptions: int = 0
    num_cached_tokens: int = 0


class _WithTimeline(_Response):
    """A response that may carry the timeline: the key is left out unless the request asked for it."""

    timeline: Optional[RequestTimeline] = None

    @model_serializer(mode="wrap")
    def _omit_timeline_unless_asked(self, handler):
        data = handler(self)
        timeline = data.pop("timeline", None)
        if timeline is not None:
            data["timeline"] = timeline  # last: after the fields OpenAI defines
        return data


# -- /v1/completions --------------------------------------------------------------
class CompletionRequest(_Request):
    model: Optional[str] = None
    # list[int] before list[str]/str: a list of ints is one tokenized prompt.
    prompt: Union[list[int], list[list[int]], str, list[str]]
    best_of: Optional[int] = None
    echo: bool = False
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    logprobs: Optional[int] = None
    max_tokens: Optional[int] = 16
    n: int = 1
    presence_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    suffix: Optional[str] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    user: Optional[str] = None
    response_format: Optional[dict[str, Any]] = None  # as on chat (vLLM accepts it on completions too)
    # vLLM extensions that the server itself handles
    add_special_tokens: bool = True
    priority: int = 0  # lower is served earlier (needs --scheduling-policy priority)
    return_timeline: bool = False  # freight's: the response carries the request's timeline


class CompletionLogProbs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None


class CompletionResponse(_WithTimeline):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


# -- /v1/chat/completions -------------------------------------------------------------
class ChatCompletionRequest(_Request):
    model: Optional[str] = None
    messages: list[Any]  # checked by serving_chat.parse_messages for clear, OpenAI-like errors
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    n: int = 1
    presence_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    user: Optional[str] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None  # false: at most one tool call
    # the legacy function calling (refused: use tools)
    functions: Optional[list[Any]] = None
    function_call: Optional[Union[str, dict[str, Any]]] = None
    # vLLM extensions that the server itself handles
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    priority: int = 0  # lower is served earlier (needs --scheduling-policy priority)
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_timeline: bool = False  # freight's: the response carries the request's timeline


class ChatLogProb(_Response):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatLogProbs(_Response):
    content: Optional[list[ChatLogProbsContent]] = None


class FunctionCall(_Response):
    name: str
    arguments: str                       # a JSON object, as text (OpenAI's shape)


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(_Response):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(_Response):
    """One fragment of a streamed tool call: id, type and name come once, then argument pieces."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None


class ChatMessage(_Response):
    role: str
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionChoice(_Response):
    index: int
    message: ChatMessage
    logprobs: Optional[ChatLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionResponse(_WithTimeline):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Optional[UsageInfo] = None


class DeltaMessage(_Response):
    role: Optional[str] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: list[DeltaToolCall] = Field(default_factory=list)


class ChatCompletionStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionStreamResponse(_WithTimeline):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# -- /v1/models ---------------------------------------------------------------------
class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "freight"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- /tokenize, /detokenize (vLLM's) ---------------------------------------------------
class TokenizeRequest(_Request):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[Any]] = None
    add_special_tokens: Optional[bool] = None  # default: True for prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None  # rendered into the chat template, as on /v1/chat/completions
    return_token_strs: bool = False


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(_Request):
    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(_Response):
    prompt: str


class VersionResponse(_Response):
    version: str


# -- /v1/embeddings ---------------------------------------------------------------------
class EmbeddingRequest(_Request):
    model: Optional[str] = None
    # list[int] before list[str]/str: a list of ints is one tokenized input.
    input: Union[list[int], list[list[int]], str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None
    # vLLM extensions
    add_special_tokens: bool = True
    normalize: Optional[bool] = None


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingResponse(_Response):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo
