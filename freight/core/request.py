"""Request: the engine core's record of one sequence as it moves through the scheduler."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from freight.pooling_params import PoolingParams
from freight.sampling_params import SamplingParams

if TYPE_CHECKING:
    from freight.structured_output.manager import StructuredOutputRequest


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # preparing or sampling it failed in the runner

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int                    # resolved against max_model_len
    eos_token_ids: frozenset[int]
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0                  # lower is served earlier (the priority scheduling policy only)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1        # prompt tokens found in the prefix cache at first admission
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, filled by KVCacheManager
    first_scheduled_time: Optional[float] = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Sibling sequences of an n > 1 request, forked from this one in the step that computes the
    # end of its prompt: they share its blocks and draw their first tokens from the same logits.
    pending_forks: list["Request"] = field(default_factory=list)
    # Its grammar and matcher when the output is constrained (structured outputs).
    structured: Optional["StructuredOutputRequest"] = None
    error: Optional[str] = None        # why it ended with FINISHED_ERROR
    pooling_params: Optional[PoolingParams] = None  # a pooling request: prefill only, no tokens sampled

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> Optional[RequestStatus]:
        """Token-level stop conditions, checked after each new token."""
        last = self.output_token_ids[-1]
        params = self.sampling_params
        if not params.ignore_eos and last in self.eos_token_ids:
            self.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if last in params.stop_token_ids:
            self.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
        if len(self.output_token_ids) >= self.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
