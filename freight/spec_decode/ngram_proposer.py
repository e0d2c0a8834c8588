"""NgramProposer: drafts from the request's own context (vLLM's "ngram" method, prompt lookup decoding).

The longest suffix of the context (between prompt_lookup_min and prompt_lookup_max tokens) that also
occurs earlier is found; the tokens that followed its latest earlier occurrence are the draft (continued
periodically when that occurrence overlaps the suffix, as in a loop). Cheap
and model-free: it pays off where the output repeats or edits the input (code edits, extraction,
quoting) and where a model loops.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, min_n: int, max_n: int, num_speculative_tokens: int):
        self.min_n = min_n
        self.max_n = max_n
        self.k = num_speculative_tokens

    def propose(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """Up to min(k, max_tokens) draft tokens to follow token_ids ([] when no n-gram matches)."""
        k = min(self.k, max_tokens)
        n0 = self.min_n
        length = len(token_ids)
        if k <= 0 or length <= n0:
            return []
        a = np.asarray(token_ids, dtype=np.int64)
        # Starts j of earlier occurrences of the last n0 tokens, each followed by at least one token.
        windows = sliding_window_view(a[:length - 1], n0)
        hits = np.flatnonzero((windows == a[length - n0:]).all(axis=1))
        if hits.size == 0:
            return []
        best = int(hits[-1])
        # Extend the match backwards, one token at a time, while some occurrence still matches.
        for n in range(n0 + 1, min(self.max_n, length - 1) + 1):
            back = hits - (n - n0)
            keep = back >= 0
            hits, back = hits[keep], back[keep]
            hits = hits[a[back] == a[length - n]]
            if hits.size == 0:
                break
            best = int(hits[-1])
        start = best + n0
        draft = a[start:start + k].tolist()
        # A match that reaches into the suffix itself means the context repeats with period
        # length - start: continue that period rather than cut the draft short.
        period = length - start
        while len(draft) < k:
            draft.append(draft[len(draft) - period])
        return draft
