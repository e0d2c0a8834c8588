"""What travels between the frontend (LLMEngine, AsyncLLM) and the engine core.

Plain msgspec structs, encoded as msgpack when the core runs in its own process.
The frontend tokenizes and renders chat templates; the core sees token ids and
SamplingParams, and answers with new token ids, logprobs and finish reasons.
"""

from __future__ import annotations

import enum
from typing import Optional, Union

import msgspec

from freight.core.stats import SchedulerStats
from freight.core.status import EngineCoreStatus
from freight.pooling_params import PoolingParams
from freight.sampling_params import SamplingParams
from freight.step_contract import LogprobsLists


class EngineCoreRequest(msgspec.Struct, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    max_tokens: int                   # resolved against max_model_len
    arrival_time: float
    # n > 1: the ids of sequences 1..n-1, forked from this one once its prompt is computed
    # (sequence i samples with params.for_sample(i)).
    fork_ids: list[str] = []
    # A pooling (embedding) request: prefill only (max_tokens 0), answered with its pooled vector.
    pooling_params: Optional[PoolingParams] = None
    priority: int = 0                 # lower is served earlier under the priority scheduling policy


class EngineCoreOutput(msgspec.Struct, omit_defaults=True, array_like=True):
    """One sequence's progress in one step."""

    request_id: str
    new_token_ids: list[int]
    new_sampled_logprobs: list[float]
    new_logprobs: Optional[LogprobsLists] = None          # when the request asked for logprobs
    new_prompt_logprobs: Optional[LogprobsLists] = None   # prompt positions computed this step
    finish_reason: Optional[str] = None                   # "stop" | "length" | "abort" | "error"
    stop_reason: Union[int, str, None] = None
    num_cached_tokens: int = 0
    first_scheduled_time: Optional[float] = None          # time.monotonic(), the same clock in every process
    error: Optional[str] = None                           # why, with finish_reason "error"
    pooling_output: Optional[list[float]] = None          # a pooling request's vector (its final output)
    num_preemptions: int = 0                              # times this sequence was preempted so far


class EngineCoreOutputs(msgspec.Struct, omit_defaults=True, tag=True):
    engine_index: int = 0
    outputs: list[EngineCoreOutput] = []
    stats: Optional[SchedulerStats] = None
    status: Optional[EngineCoreStatus] = None   # only while a status page watches (core/status.py)


class EngineCoreReady(msgspec.Struct, tag=True):
    """Sent once by a core when it is ready to serve (or has failed to start)."""

    engine_index: int
    max_model_len: int = 0
    num_blocks: int = 0
    device: str = ""     # where its model runs, e.g. "cpu", "cuda:0"
    dtype: str = ""      # e.g. "bfloat16"
    error: Optional[str] = None


class RequestType(enum.IntEnum):
    ADD = 0
    ABORT = 1
    UTILITY = 2     # a named method of the core, e.g. reset_prefix_cache
    SHUTDOWN = 3


class CoreFinish(msgspec.Struct):
    """Finish requests in the core: an abort, or a stop string the frontend found."""

    request_ids: list[str]
    stopped: bool = False


class CoreUtility(msgspec.Struct):
    method: str


CoreInput = Union[EngineCoreRequest, CoreFinish, CoreUtility, None]
_CORE_INPUT_TYPES = {RequestType.ADD: EngineCoreRequest, RequestType.ABORT: CoreFinish,
                     RequestType.UTILITY: CoreUtility}
_encoder = msgspec.msgpack.Encoder()
_input_decoders = {t: msgspec.msgpack.Decoder(cls) for t, cls in _CORE_INPUT_TYPES.items()}
_output_decoder = msgspec.msgpack.Decoder(Union[EngineCoreOutputs, EngineCoreReady])


def encode(obj) -> bytes:
    return _encoder.encode(obj)


def decode_input(kind: RequestType, data: bytes) -> CoreInput:
    return _input_decoders[kind].decode(data) if kind in _input_decoders else None


def decode_output(data: bytes) -> Union[EngineCoreOutputs, EngineCoreReady]:
    return _output_decoder.decode(data)
