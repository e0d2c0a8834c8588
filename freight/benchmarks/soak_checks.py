"""What `freight bench soak` demands of each response: OpenAI's shape, consistent counts, no error events."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

FINISH_REASONS = ("stop", "length")


@dataclass
class Plan:
    """One request: where it goes, its body, and whether (and when) the client hangs up."""
    index: int
    chat: bool
    body: dict
    num_choices: int
    stops: list[str]
    abort_after_chunks: int = 0       # streams: hang up after this many data events (0: never)
    abort_after_s: float = 0.0        # plain requests: hang up after this many seconds (0: never)

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def aborting(self) -> bool:
        return bool(self.abort_after_chunks or self.abort_after_s)


class Malformed(Exception):
    pass


def _need(cond: bool, problem: str) -> None:
    if not cond:
        raise Malformed(problem)


def _check_usage(u: Any, num_choices: int, max_tokens: int) -> None:
    _need(isinstance(u, dict), f"usage is not an object: {u!r}")
    vals = [u.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
    _need(all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals),
          f"usage counts are not non-negative integers: {u!r}")
    _need(vals[0] + vals[1] == vals[2], f"usage total_tokens != prompt_tokens + completion_tokens: {u!r}")
    _need(vals[1] <= num_choices * max_tokens, f"usage completion_tokens over n * max_tokens: {u!r}")


def _check_stops(text: str, stops: list[str], where: str) -> None:
    for s in stops:
        _need(s not in text, f"{where} contains its stop string {s!r}: {text!r}")


def _check_logprobs(plan: Plan, lp: Any, where: str) -> None:
    if plan.chat:
        _need(isinstance(lp, dict) and isinstance(lp.get("content"), list), f"{where}.logprobs has no content list")
        for item in lp["content"]:
            _need(isinstance(item, dict) and isinstance(item.get("token"), str) and
                  isinstance(item.get("logprob"), (int, float)), f"{where}.logprobs item malformed: {item!r}")
            tops = item.get("top_logprobs")
            _need(isinstance(tops, list) and len(tops) <= plan.body.get("top_logprobs", 0),
                  f"{where}.logprobs top_logprobs malformed: {item!r}")
    else:
        _need(isinstance(lp, dict), f"{where}.logprobs is not an object")
        tokens, token_lps = lp.get("tokens"), lp.get("token_logprobs")
        _need(isinstance(tokens, list) and isinstance(token_lps, list) and len(tokens) == len(token_lps),
              f"{where}.logprobs tokens/token_logprobs missing or of different lengths")


def _wants_logprobs(plan: Plan) -> bool:
    return bool(plan.body.get("logprobs")) if plan.chat else plan.body.get("logprobs") is not None


def check_full(plan: Plan, data: Any) -> None:
    """A non-streamed response body."""
    _need(isinstance(data, dict), "body is not a JSON object")
    _need("error" not in data, "body has an 'error'")
    choices = data.get("choices")
    _need(isinstance(choices, list) and len(choices) == plan.num_choices,
          f"expected {plan.num_choices} choice(s), got {len(choices) if isinstance(choices, list) else choices!r}")
    _need(sorted(c.get("index") if isinstance(c, dict) else None for c in choices) == list(range(plan.num_choices)),
          "choice indexes are not 0..len-1")
    for c in choices:
        where = f"choices[{c['index']}]"
        _need(c.get("finish_reason") in FINISH_REASONS, f"{where}.finish_reason is {c.get('finish_reason')!r}")
        if plan.chat:
            msg = c.get("message")
            _need(isinstance(msg, dict) and msg.get("role") == "assistant" and isinstance(msg.get("content"), str),
                  f"{where}.message malformed: {msg!r}")
            text = msg["content"]
        else:
            text = c.get("text")
            _need(isinstance(text, str), f"{where}.text is not a string")
        _check_stops(text, plan.stops, where)
        if _wants_logprobs(plan):
            _check_logprobs(plan, c.get("logprobs"), where)
    _check_usage(data.get("usage"), plan.num_choices, plan.body["max_tokens"])


class StreamCheck:
    """Server-sent events of one stream, checked as they arrive."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.events = 0            # data events (JSON ones)
        self.done = False          # [DONE] seen
        self.texts = [""] * plan.num_choices
        self.finished = [False] * plan.num_choices
        self.last: Optional[dict] = None

    def line(self, line: str) -> None:
        if not line.startswith("data:"):
            _need(not line.strip() or line.startswith((":", "event:", "id:", "retry:")),
                  f"unexpected line in the stream: {line[:200]!r}")
            return
        payload = line[5:].strip()
        _need(not self.done, f"data after [DONE]: {payload[:200]!r}")
        if payload == "[DONE]":
            self.done = True
            return
        try:
            event = json.loads(payload)
        except ValueError:
            raise Malformed(f"data line is not JSON: {payload[:200]!r}") from None
        _need(isinstance(event, dict), f"event is not an object: {payload[:200]!r}")
        _need("error" not in event, f"error event: {payload[:300]}")
        self.events += 1
        self.last = event
        choices = event.get("choices")
        _need(isinstance(choices, list), f"event without a choices list: {payload[:200]!r}")
        for c in choices:
            _need(isinstance(c, dict), "choice is not an object")
            i = c.get("index")
            _need(isinstance(i, int) and 0 <= i < self.plan.num_choices, f"choice index {i!r} out of range")
            _need(not self.finished[i], f"choices[{i}] continues after its finish_reason")
            if self.plan.chat:
                delta = c.get("delta")
                _need(isinstance(delta, dict), f"choices[{i}].delta is not an object")
                piece = delta.get("content") or ""
            else:
                piece = c.get("text")
                _need(isinstance(piece, str), f"choices[{i}].text is not a string")
            _need(isinstance(piece, str), f"choices[{i}] content is not a string")
            self.texts[i] += piece
            reason = c.get("finish_reason")
            if reason is not None:
                _need(reason in FINISH_REASONS, f"choices[{i}].finish_reason is {reason!r}")
                self.finished[i] = True
            if c.get("logprobs") is not None and _wants_logprobs(self.plan):
                _check_logprobs(self.plan, c["logprobs"], f"choices[{i}]")

    def end(self) -> None:
        _need(self.done, "the stream ended without [DONE]")
        missing = [i for i, f in enumerate(self.finished) if not f]
        _need(not missing, f"choice(s) {missing} never got a finish_reason")
        for i, text in enumerate(self.texts):
            _check_stops(text, self.plan.stops, f"choices[{i}]")
        if (self.plan.body.get("stream_options") or {}).get("include_usage"):
            last = self.last or {}
            _need(last.get("choices") == [], "the last event is not the usage chunk (choices [])")
            _check_usage(last.get("usage"), self.plan.num_choices, self.plan.body["max_tokens"])


# -- sending ----------------------------------------------------------------------------
