"""What the engine hands back to callers, shaped like vLLM's RequestOutput."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class CompletionOutput:
    """One generated sequence of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[list[dict[int, float]]] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """A request's timeline, on time.monotonic() (the same clock in the engine-core process).

    The phases follow vLLM's RequestStateStats: queued from arrival until first scheduled,
    prefill until the first token, decode until the last token; inference is prefill plus
    decode. A phase is None until its end is known (and stays None for a request aborted
    before it got there)."""

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_preemptions: int = 0          # over all the request's sequences
    # The request's sampling parameters that vLLM's request histograms observe.
    n_param: int = 1
    max_tokens_param: Optional[int] = None

    @property
    def queue_time(self) -> Optional[float]:
        return _span(self.arrival_time, self.first_scheduled_time)

    @property
    def prefill_time(self) -> Optional[float]:
        return _span(self.first_scheduled_time, self.first_token_time)

    @property
    def decode_time(self) -> Optional[float]:
        return _span(self.first_token_time, self.last_token_time)

    @property
    def inference_time(self) -> Optional[float]:
        return _span(self.first_scheduled_time, self.last_token_time)

    @property
    def e2e_time(self) -> Optional[float]:
        return _span(self.arrival_time, self.finished_time)


def _span(start: Optional[float], end: Optional[float]) -> Optional[float]:
    # Clamped at 0: the two ends may be read in different processes.
    return None if start is None or end is None else max(end - start, 0.0)


@dataclass
class RequestOutput:
    """The state of one request after an engine step (or at the end of generate())."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: Optional[RequestMetrics] = None
    prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None
    # Text and tokens produced since the previous RequestOutput of this request
    # (what a streaming API sends); not part of vLLM's class, but cheap to carry.
    delta_text: list[str] = field(default_factory=list)
    delta_token_ids: list[list[int]] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
                f"prompt_token_ids={self.prompt_token_ids}, outputs={self.outputs}, "
                f"finished={self.finished})")


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """A pooling request's result, shaped like vLLM's (LLM.embed returns these)."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    prompt: Optional[str] = None
    metrics: Optional[RequestMetrics] = None
