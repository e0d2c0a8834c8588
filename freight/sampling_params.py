"""SamplingParams: how to pick tokens and when to stop, with vLLM's fields and defaults."""

from __future__ import annotations

import copy
import json as _json
import math
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

_GREEDY_EPS = 1e-5


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; `param` names the field (for API errors)."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a JSON schema, a regex, a choice of strings or a grammar (vLLM's fields).

    Exactly one of json, regex, choice, grammar, json_object and structural_tag is set."""

    json: Union[str, dict, None] = None           # a JSON schema (object or its text)
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None                 # EBNF (GBNF-style) or Lark
    json_object: Optional[bool] = None            # any JSON object
    disable_fallback: bool = False                # with backend "auto": no fallback to the other backend
    disable_any_whitespace: bool = False          # JSON without free whitespace between tokens
    # objects without "additionalProperties" get it as false (freight always does so, as xgrammar's strict mode)
    disable_additional_properties: bool = False
    whitespace_pattern: Optional[str] = None      # a regex for JSON whitespace (llguidance only)
    structural_tag: Optional[str] = None          # xgrammar's structural tag, as JSON text

    KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

    def __post_init__(self) -> None:
        set_kinds = [k for k in self.KINDS if getattr(self, k) is not None]
        if len(set_kinds) != 1:
            what = "none" if not set_kinds else ", ".join(set_kinds)
            raise SamplingParamsError(
                f"structured_outputs needs exactly one of {', '.join(self.KINDS)}; got {what}.", "structured_outputs")
        bad = None
        if self.json is not None and not isinstance(self.json, (str, dict)):
            bad = "json must be a JSON schema (an object or its text)"
        elif self.regex is not None and not isinstance(self.regex, str):
            bad = "regex must be a string"
        elif self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                          or any(not isinstance(c, str) for c in self.choice)):
            bad = "choice must be a non-empty list of strings"
        elif self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            bad = "grammar must be a non-empty string"
        elif self.json_object is not None and self.json_object is not True:
            bad = "json_object must be true when given"
        elif self.structural_tag is not None and not isinstance(self.structural_tag, str):
            bad = "structural_tag must be a string (JSON)"
        for name in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                bad = f"{name} must be a boolean"
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            bad = "whitespace_pattern must be a string"
        if bad:
            raise SamplingParamsError(f"structured_outputs: {bad}.", "structured_outputs")
        if self.choice is not None:
            self.choice = list(self.choice)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> "StructuredOutputsParams":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SamplingParamsError(f"structured_outputs: unknown field(s) {', '.join(unknown)}; the fields are "
                                      f"{', '.join(sorted(known))}.", "structured_outputs")
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) is not None)

    def cache_key(self) -> str:
        """A canonical text of the constraint and its options (grammar caches key on it)."""
        return _json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, sort_keys=True, default=str)


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
    structured_outputs: Optional[StructuredOutputsParams] = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                    StructuredOutputsParams):
            raise SamplingParamsError("structured_outputs must be a StructuredOutputsParams or an object.",
                                      "structured_outputs")
        if isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k == -1:
            self.top_k = 0  # vLLM's "off"
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self._validate()
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}

    def _validate(self) -> None:
        def bad(msg: str, param: str) -> None:
            raise SamplingParamsError(msg, param)

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_int_like(x) -> bool:  # JSON clients send "5" as a string sometimes; ids may be str keys
            try:
                return not isinstance(x, (bool, float)) and int(x) >= 0
            except (TypeError, ValueError):
                return False

        def number(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            # NaN and inf pass plain comparisons, so check finiteness first.
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if ok:
                ok = (v > lo if lo_open else v >= lo) and v <= hi
            if not ok:
                bound = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
                bad(f"{name} must be a number in {bound}, got {v!r}.", name)

        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be a boolean, got {getattr(self, name)!r}.", name)
        if not is_int(self.n) or self.n < 1:
            bad(f"n must be an integer of at least 1, got {self.n!r}.", "n")
        if self.best_of is not None and (not is_int(self.best_of) or self.best_of < self.n):
            bad(f"best_of must be an integer no smaller than n ({self.n}), got {self.best_of!r}.", "best_of")
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        number("repetition_penalty", 0.0, 1e4, lo_open=True)
        number("temperature", 0.0, 1e4)
        number("top_p", 0.0, 1.0, lo_open=True)
        number("min_p", 0.0, 1.0)
        if not is_int(self.top_k) or self.top_k < 0:
            bad(f"top_k must be -1 (off) or a non-negative integer, got {self.top_k!r}.", "top_k")
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
        # A generator takes a 64-bit seed, and sample i of an n > 1 request uses seed + i.
        if self.seed is not None and not -2**63 <= self.seed <= 2**64 - (self.best_of or self.n):
            bad(f"seed must be in [-2**63, 2**64 - {self.best_of or self.n}] (64 bits, one per sample), "
                f"got {self.seed}.", "seed")
        if not isinstance(self.stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in self.stop):
            bad(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}.", "stop")
        if (not isinstance(self.stop_token_ids, (list, tuple))
                or any(not is_int(t) or t < 0 for t in self.stop_token_ids)):
            bad("stop_token_ids must be a list of non-negative integers.", "stop_token_ids")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias must map token ids to values in [-100, 100].", "logit_bias")
            for tok, bias in self.logit_bias.items():
                ok_bias = (isinstance(bias, (int, float)) and not isinstance(bias, bool)
                           and math.isfinite(bias) and -100.0 <= bias <= 100.0)
                if not is_int_like(tok) or not ok_bias:
                    bad(f"logit_bias must map token ids to values in [-100, 100], got {tok!r}: {bias!r}.",
                        "logit_bias")

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
