"""The step contract: what the scheduler tells the model runner, and what comes back.

Plain data only (msgspec structs of ints, strings, lists and SamplingParams), so a step
can cross a process boundary: the engine core may hand it to a runner in another
process, or to several tensor-parallel ranks. Only the diff travels: a request's
prompt, sampling parameters and block table are sent once (NewRequestData); after
that a step names it with its new blocks and computed-token count (CachedRequestData).
The runner keeps everything else (its token history, generators, penalty counts) in
its own persistent batch, and appends the tokens it sampled itself.

Neither side holds the other's objects: the scheduler never sees runner state, the
runner never imports the scheduler's Request.
"""

from __future__ import annotations

from typing import Optional, Union

import msgspec
import numpy as np

from freight.pooling_params import PoolingParams
from freight.sampling_params import SamplingParams


class NewRequestData(msgspec.Struct, omit_defaults=True):
    """A request the runner has not seen (or a fork of one it has): everything it needs, once."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]          # banned while under min_tokens
    block_ids: list[int]
    num_computed_tokens: int          # before this step (prefix-cache hits are already computed)
    # A fork (a sibling sequence of an n > 1 request): it holds the parent's computed prompt and
    # blocks, is scheduled for 0 tokens, and draws its first token from the parent's last row.
    parent_req_id: Optional[str] = None
    # A pooling (embedding) request: prefill only; the step that completes its prompt returns the
    # pooled vector (ModelRunnerOutput.pooler_output) instead of sampling. pooling_type is resolved.
    pooling_params: Optional[PoolingParams] = None


class CachedRequestData(msgspec.Struct, omit_defaults=True):
    """A request the runner already holds: only what changed."""

    req_id: str
    num_computed_tokens: int          # before this step
    new_block_ids: list[int]          # appended to its block table ...
    # ... or, when set, its whole block table (resumed after preemption, or a block copied on write)
    reset_block_ids: bool = False


class SchedulerOutput(msgspec.Struct, omit_defaults=True):
    scheduled_new_reqs: list[NewRequestData] = []
    scheduled_cached_reqs: list[CachedRequestData] = []
    num_scheduled_tokens: dict[str, int] = {}    # req id -> tokens to run this step (0 for a fork)
    total_num_scheduled_tokens: int = 0
    # Draft tokens to verify per request (speculative decoding): they follow its last token as inputs
    # (counted in num_scheduled_tokens), each with a logits row.
    scheduled_spec_decode_tokens: dict[str, list[int]] = {}
    finished_req_ids: list[str] = []             # since the previous step: the runner drops their state
    block_copies: list[tuple[int, int]] = []     # (src, dst), done before the forward
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0

    @property
    def scheduled_req_ids(self) -> list[str]:
        return [r.req_id for r in self.scheduled_new_reqs] + [r.req_id for r in self.scheduled_cached_reqs]


class GrammarOutput(msgspec.Struct, omit_defaults=True):
    """The token bitmask of this step's constrained rows, filled by the engine core while the forward ran.

    Row i (int32 words, little-endian) belongs to req_ids[i]: bit t set = token t allowed."""

    req_ids: list[str] = []
    bitmask: bytes = b""
    num_words: int = 0

    def array(self) -> "np.ndarray":
        return np.frombuffer(self.bitmask, dtype="<i4").reshape(len(self.req_ids), self.num_words)

    @classmethod
    def from_array(cls, req_ids: list[str], mask: "np.ndarray") -> "GrammarOutput":
        return cls(req_ids, np.ascontiguousarray(mask, dtype="<i4").tobytes(), mask.shape[1])


class LogprobsLists(msgspec.Struct, array_like=True):
    """Logprobs of some positions, one row each: the chosen (or prompt) token first, then the top-k."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]

    def to_dicts(self) -> list[dict[int, float]]:
        return [dict(zip(ids, lps)) for ids, lps in zip(self.token_ids, self.logprobs)]


class ModelRunnerOutput(msgspec.Struct, omit_defaults=True):
    req_ids: list[str] = []                       # the rows that sampled this step
    sampled_token_ids: list[list[int]] = []       # per row: the accepted drafts, then one token of its own
    sampled_logprobs: list[list[float]] = []      # logprob of each sampled token (raw distribution)
    logprobs: dict[str, LogprobsLists] = {}       # rows whose request asked for logprobs
    prompt_logprobs: dict[str, LogprobsLists] = {}  # this step's prompt positions, per request
    # Requests whose preparation or sampling failed (req id -> why); the rest of the step is unaffected.
    failed: dict[str, str] = {}
    # Pooling requests whose prompt completed this step: req id -> the pooled (and, as asked,
    # truncated and normalised) vector.
    pooler_output: dict[str, list[float]] = {}


StepMessage = Union[SchedulerOutput, GrammarOutput, ModelRunnerOutput]
_encoder = msgspec.msgpack.Encoder()
_decoders = {cls: msgspec.msgpack.Decoder(cls) for cls in (SchedulerOutput, GrammarOutput, ModelRunnerOutput)}


def encode(message: StepMessage) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, cls: type) -> StepMessage:
    return _decoders[cls].decode(data)
