"""Incremental detokenization: text deltas that are always valid, complete characters.

Uses the tokenizers library's DecodeStream, seeded with the prompt's last tokens so
that the first generated token keeps its leading space (as the text continues the
prompt). A token that ends mid-character (byte-level BPE, byte fallback) yields
nothing until the character is complete.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

# Prompt tokens of context for the first output token (enough for any merge to settle).
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(ids=list(prompt_token_ids[-_CONTEXT_TOKENS:]),
                                    skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        try:
            return self._stream.step(self._backend, token_id) or ""
        except Exception:
            # An id the decoder cannot place (e.g. past the vocabulary): emit nothing for it.
            return ""
