"""Token strings and logprobs in the two OpenAI formats (completions and chat).

The engine gives, per generated token, {token_id: logprob} with the sampled token
first and then the top-k. The sampled tokens' strings come from an incremental
detokenizer seeded with the prompt, so they concatenate to the generated text
(leading spaces included, as OpenAI's do). A top-k alternative is decoded after the
previous token and the previous token's text is cut off, which keeps its leading
space for sentencepiece and byte-level tokenizers alike.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from freight.engine.detokenizer import IncrementalDetokenizer
from freight.entrypoints.openai.protocol import ChatLogProb, ChatLogProbsContent, CompletionLogProbs

_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM uses the same floor


def _clamp(lp: float) -> float:
    return _MIN_LOGPROB if math.isinf(lp) or math.isnan(lp) or lp < _MIN_LOGPROB else lp


class TokenStrings:
    """Per-token texts for one sequence, fed incrementally as tokens arrive (streams)."""

    def __init__(self, tokenizer, context_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer, list(context_ids), skip_special_tokens)
        self._prev: Optional[int] = context_ids[-1] if context_ids else None
        self._alt_cache: dict[tuple[Optional[int], int], str] = {}

    def next(self, token_id: int) -> tuple[str, Optional[int]]:
        """The text of the next sampled token, and the token before it (for alternatives)."""
        prev, self._prev = self._prev, token_id
        return self._detok.step(token_id), prev

    def alternative(self, prev: Optional[int], token_id: int) -> str:
        key = (prev, token_id)
        if key not in self._alt_cache:
            dec = self.tokenizer.decode
            if prev is None:
                text = dec([token_id], skip_special_tokens=False)
            else:
                before, both = dec([prev], skip_special_tokens=False), dec([prev, token_id], skip_special_tokens=False)
                text = both[len(before):] if both.startswith(before) else dec([token_id], skip_special_tokens=False)
            self._alt_cache[key] = text
        return self._alt_cache[key]


def completion_logprobs(strings: TokenStrings, token_ids: Sequence[int],
                        logprobs: Sequence[Optional[dict[int, float]]], text_offset: int) -> CompletionLogProbs:
    """The legacy completions format; a position without logprobs (the first prompt token) gets None."""
    out = CompletionLogProbs()
    for tok, lps in zip(token_ids, logprobs):
        text, prev = strings.next(tok)
        out.tokens.append(text)
        out.text_offset.append(text_offset)
        text_offset += len(text)
        if not lps:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_clamp(lps[tok]) if tok in lps else None)
        top: dict[str, float] = {}
        for alt, lp in lps.items():
            top.setdefault(text if alt == tok else strings.alternative(prev, alt), _clamp(lp))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(strings: TokenStrings, token_ids: Sequence[int], logprobs: Sequence[dict[int, float]],
                  num_top: int) -> list[ChatLogProbsContent]:
    """The chat format: each token with its bytes and exactly `num_top` best alternatives."""
    content = []
    for tok, lps in zip(token_ids, logprobs):
        text, prev = strings.next(tok)
        top = sorted(lps.items(), key=lambda kv: kv[1], reverse=True)[:num_top]
        alts = []
        for alt, lp in top:
            s = text if alt == tok else strings.alternative(prev, alt)
            alts.append(ChatLogProb(token=s, logprob=_clamp(lp), bytes=list(s.encode("utf-8"))))
        content.append(ChatLogProbsContent(token=text, logprob=_clamp(lps.get(tok, _MIN_LOGPROB)),
                                           bytes=list(text.encode("utf-8")), top_logprobs=alts))
    return content
