"""CachedRequestState: what the model runner keeps about one request between steps.

Created from the step contract's NewRequestData (sent once) and kept until the request
is in a step's finished_req_ids, including while it is preempted: its token history
(the prompt plus every token the runner sampled for it), its seeded generator, its
penalty counts and its block table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from freight.pooling_params import PoolingParams
from freight.sampling_params import SamplingParams
from freight.worker.sampling_tensors import TokenCounts


@dataclass(eq=False)
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    num_computed_tokens: int
    generator: Optional[torch.Generator] = None
    token_ids: list[int] = field(default_factory=list)  # prompt + outputs
    num_prompt_logprobs_done: int = 0  # prompt positions whose logprobs were sent (survives preemption)
    token_counts: Optional[TokenCounts] = None  # penalties' statistics, when the request uses penalties
    fork_of: Optional[str] = None  # a fork not yet sampled: its first token comes from this request's row
    # Set when preparing or sampling this request failed: its tokens still run through the forward
    # (so the KV blocks it shares stay valid), but it samples nothing and the step reports it failed.
    error: Optional[str] = None
    # A pooling request (prefill only): with mean pooling, the sum of its prompt rows' hidden
    # states over the chunks computed so far (fp32), and how many rows it holds.
    pooling_params: Optional[PoolingParams] = None
    pool_sum: Optional[torch.Tensor] = None
    pool_count: int = 0
    # This step's draft tokens to verify (speculative decoding): inputs after its last token, never
    # part of token_ids until sampling accepts them.
    spec_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    def input_token_ids(self, start: int, count: int) -> list[int]:
        """The step's input tokens from position start: its tokens, then its drafts."""
        if not self.spec_token_ids:
            return self.token_ids[start:start + count]
        return (self.token_ids[start:] + self.spec_token_ids)[:count]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.token_counts is not None:
            self.token_counts.add(token_id)
