"""SamplingParams: how to pick tokens and when to stop, with vLLM's fields and defaults."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Union

_GREEDY_EPS = 1e-5


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; `param` names the field (for API errors)."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    best_of: Optional[int] = None         # sample this many, return the n with the best cumulative logprob
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                        # 0 or -1: off
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None        # top-k logprobs per generated token (0: the sampled one only)
    prompt_logprobs: Optional[int] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: Optional[dict[int, float]] = None

    def __post_init__(self) -> None:
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str, param: str) -> None:
            raise SamplingParamsError(msg, param)

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.n) or self.n < 1:
            bad(f"n must be an integer of at least 1, got {self.n!r}.", "n")
        if self.best_of is not None and (not is_int(self.best_of) or self.best_of < self.n):
            bad(f"best_of must be an integer no smaller than n ({self.n}), got {self.best_of!r}.", "best_of")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                bad(f"{name} must be in [-2, 2], got {v}.", name)
        if self.repetition_penalty <= 0.0:
            bad(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.",
                "repetition_penalty")
        if self.temperature < 0.0:
            bad(f"temperature must be non-negative, got {self.temperature}.", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}.", "top_p")
        if not is_int(self.top_k):
            bad(f"top_k must be an integer, got {self.top_k!r}.", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}.", "min_p")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            bad(f"max_tokens must be at least 1, got {self.max_tokens!r}.", "max_tokens")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            bad(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}.", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens}).", "min_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                bad(f"{name} must be a non-negative integer, got {v!r}.", name)
        if self.seed is not None and not is_int(self.seed):
            bad(f"seed must be an integer, got {self.seed!r}.", "seed")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop must be a non-empty string or a list of non-empty strings.", "stop")
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers.", "stop_token_ids")
        for tok, bias in (self.logit_bias or {}).items():
            if tok < 0 or not -100.0 <= bias <= 100.0:
                bad(f"logit_bias must map token ids to values in [-100, 100], got {tok}: {bias}.", "logit_bias")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def n_seqs(self) -> int:
        """How many sequences to generate (best_of when set)."""
        return self.best_of or self.n

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def for_sample(self, index: int) -> "SamplingParams":
        """The parameters of the index-th sequence of a request with n_seqs > 1 (distinct seeds)."""
        if index == 0:
            return self
        p = copy.copy(self)
        if self.seed is not None:
            p.seed = self.seed + index
        return p

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)
