"""SamplingTensors: one step's per-request sampling parameters as batch tensors.

Built once per step from the rows to sample; a group of optional tensors stays None
when no row in the batch uses that feature, so plain greedy batches pay for nothing.
Rows are any objects with `sampling_params`, `prompt_token_ids`, `output_token_ids` and
`eos_token_ids` (the runner's CachedRequestState); penalties read a request's
TokenCounts, which the runner updates one token at a time instead of recounting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch



class TokenCounts:
    """A request's token statistics over the vocabulary, kept up to date token by token."""

    def __init__(self, prompt_ids: list[int], output_ids: list[int], vocab_size: int, device) -> None:
        self.vocab_size = vocab_size
        self.output_counts = _scatter_rows([output_ids], vocab_size, device, torch.float32)[0]
        # repetition penalty's set: prompt or output
        self.seen = (_scatter_rows([prompt_ids], vocab_size, device, torch.float32)[0] > 0) | (self.output_counts > 0)

    def add(self, token_id: int) -> None:
        if token_id < self.vocab_size:
            self.output_counts[token_id] += 1
            self.seen[token_id] = True


def token_counts(req, vocab_size: int, device) -> TokenCounts:
    counts = getattr(req, "token_counts", None)
    if counts is None:
        counts = TokenCounts(req.prompt_token_ids, req.output_token_ids, vocab_size, device)
    return counts


def _num_outputs(req) -> int:
    n = getattr(req, "num_output_tokens", None)
    return n if n is not None else len(req.output_token_ids)


@dataclass
class Penalties:
    repetition: torch.Tensor      # [B] (1.0: off)
    presence: torch.Tensor        # [B]
    frequency: torch.Tensor       # [B]
    output_counts: torch.Tensor   # [B, V] occurrences of each token in the output so far
    seen: torch.Tensor            # [B, V] bool: in prompt or output (repetition penalty's set)


@dataclass
class SamplingTensors:
    temperature: torch.Tensor            # [B]; 1.0 for greedy rows (unused there)
    greedy: torch.Tensor                 # [B] bool
    all_greedy: bool
    top_k: Optional[torch.Tensor]        # [B] int; V where off
    top_p: Optional[torch.Tensor]        # [B]; 1.0 where off
    min_p: Optional[torch.Tensor]        # [B]; 0.0 where off
    penalties: Optional[Penalties]
    logit_bias: Optional[torch.Tensor]   # [B, V] additive
    banned: Optional[torch.Tensor]       # [B, V] bool: eos/stop ids while under min_tokens
    generators: list[Optional[torch.Generator]]  # per row; None: the engine-wide generator
    max_num_logprobs: int                # largest top-k logprobs any row asked for (-1: none)

    @classmethod
    def from_requests(cls, reqs: list, generators: list[Optional[torch.Generator]],
                      vocab_size: int, device: torch.device) -> "SamplingTensors":
        params = [r.sampling_params for r in reqs]
        greedy = [p.greedy for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]

        def t(xs, dt):
            return torch.tensor(xs, dtype=dt, device=device)

        return cls(
            temperature=t([1.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32),
            greedy=t(greedy, torch.bool),
            all_greedy=all(greedy),
            top_k=t(top_k, torch.int64) if any(k < vocab_size for k in top_k) else None,
            top_p=t([p.top_p for p in params], torch.float32) if any(p.top_p < 1.0 for p in params) else None,
            min_p=t([p.min_p for p in params], torch.float32) if any(p.min_p > 0.0 for p in params) else None,
            penalties=_penalties(reqs, vocab_size, device) if any(p.uses_penalties for p in params) else None,
            logit_bias=_logit_bias(reqs, vocab_size, device) if any(p.logit_bias for p in params) else None,
            banned=_min_tokens_ban(reqs, vocab_size, device),
            generators=generators,
            max_num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
        )


def _scatter_rows(rows_of_ids: list[list[int]], vocab_size: int, device, dtype) -> torch.Tensor:
    """[B, V] tensor counting each row's ids (ids outside the vocabulary are ignored)."""
    rows = [i for i, ids in enumerate(rows_of_ids) for _ in ids]
    cols = [tok for ids in rows_of_ids for tok in ids]
    out = torch.zeros(len(rows_of_ids), vocab_size, dtype=dtype, device=device)
    if cols:
        r = torch.tensor(rows, device=device)
        c = torch.tensor(cols, device=device)
        keep = c < vocab_size
        out.index_put_((r[keep], c[keep]), torch.ones(int(keep.sum()), dtype=dtype, device=device),
                       accumulate=True)
    return out


def _penalties(reqs: list, vocab_size: int, device) -> Penalties:
    params = [r.sampling_params for r in reqs]
    zeros = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    stats = [token_counts(r, vocab_size, device) if p.uses_penalties else None for r, p in zip(reqs, params)]
    counts = torch.stack([s.output_counts if s is not None else zeros for s in stats])
    # The prompt counts for the repetition penalty only: a presence penalty alone looks at the output.
    seen = torch.stack([(s.seen if p.repetition_penalty != 1.0 else s.output_counts > 0) if s is not None
                        else zeros > 0 for s, p in zip(stats, params)])
    return Penalties(
        repetition=torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device),
        presence=torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device),
        frequency=torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device),
        output_counts=counts, seen=seen)


def _logit_bias(reqs: list, vocab_size: int, device) -> torch.Tensor:
    bias = torch.zeros(len(reqs), vocab_size, dtype=torch.float32, device=device)
    for i, r in enumerate(reqs):
        for tok, b in (r.sampling_params.logit_bias or {}).items():
            if tok < vocab_size:
                bias[i, tok] = b
    return bias


def _min_tokens_ban(reqs: list, vocab_size: int, device) -> Optional[torch.Tensor]:
    """While a request has fewer than min_tokens outputs, its eos and stop ids may not be sampled."""
    rows = []
    for r in reqs:
        p = r.sampling_params
        if _num_outputs(r) < p.min_tokens:
            rows.append(list(p.stop_token_ids) + ([] if p.ignore_eos else list(r.eos_token_ids)))
        else:
            rows.append([])
    if not any(rows):
        return None
    return _scatter_rows(rows, vocab_size, device, torch.float32) > 0
