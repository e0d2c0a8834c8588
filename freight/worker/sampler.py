"""Sampler: turns the last-position logits of a batch into next tokens, all rows at once.

Order of operations follows vLLM: logprobs are taken from the raw logits; then
min_tokens bans, logit_bias and the penalties shape the logits (greedy rows take
the argmax here); then temperature, min_p, top-k and top-p filter what is sampled.
Random draws use the exponential race (argmax of p / E, E ~ Exp(1), is a draw from p),
so a seeded request takes its noise from its own generator and samples the same
tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from freight.kernels.greedy import greedy
from freight.worker.sampling_tensors import Penalties, SamplingTensors


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor                # [B]
    logprobs: torch.Tensor                 # [B] log-probability of each sampled token (raw model distribution)
    top_token_ids: Optional[torch.Tensor]  # [B, K] when any row asked for logprobs
    top_logprobs: Optional[torch.Tensor]


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """Repetition penalty as transformers' RepetitionPenaltyLogitsProcessor (over prompt and output);
    presence and frequency penalties as OpenAI defines them (over the output)."""
    rep = p.repetition[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(p.seen, penalised, logits)
    return logits - p.frequency[:, None] * p.output_counts - p.presence[:, None] * (p.output_counts > 0)


def filter_logits(logits: torch.Tensor, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor],
                  min_p: Optional[torch.Tensor]) -> torch.Tensor:
    """Mask with -inf what lies outside each row's min_p floor, top-k and top-p nucleus."""
    if min_p is not None:
        probs = torch.softmax(logits, dim=-1)
        floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    if top_p is not None:
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token while the mass ranked above it is below top_p (the top token always stays).
        # Only rows that ask for it: at top_p=1 a float cumsum can reach 1.0 before the tail.
        cut = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p < 1.0)[:, None]
        sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return logits.scatter(1, order, sorted_logits)


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, st: SamplingTensors) -> SamplerOutput:
        if (st.all_greedy and st.max_num_logprobs <= 0 and st.banned is None and st.logit_bias is None
                and st.penalties is None):  # plain greedy: one native pass per row, no log_softmax tensor
            fast = greedy(logits)
            if fast is not None:
                return SamplerOutput(fast[0], fast[1], None, None)
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        logits = self.process(logits, st)
        tokens = logits.argmax(dim=-1)
        if not st.all_greedy:
            tokens = torch.where(st.greedy, tokens, self._sample(logits, st))
        top_ids = top_lp = None
        if st.max_num_logprobs > 0:
            top_lp, top_ids = logprobs.topk(st.max_num_logprobs, dim=-1)
        return SamplerOutput(tokens, logprobs.gather(1, tokens[:, None]).squeeze(1), top_ids, top_lp)

    @staticmethod
    def process(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
        if st.banned is not None:
            logits = logits.masked_fill(st.banned, float("-inf"))
        if st.logit_bias is not None:
            logits = logits + st.logit_bias
        if st.penalties is not None:
            logits = apply_penalties(logits, st.penalties)
        return logits

    def probs(self, logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
        """The distribution each non-greedy row samples from (after temperature and filters)."""
        logits = filter_logits(logits / st.temperature[:, None], st.top_k, st.top_p, st.min_p)
        return torch.softmax(logits, dim=-1)

    def _sample(self, logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
        probs = self.probs(logits, st)
        noise = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(st.generators) if g is None]
        if len(unseeded) == len(st.generators):
            noise.exponential_(generator=self.generator)
        elif unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_(
                generator=self.generator)
        for i, g in enumerate(st.generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        # exponential_ can return exactly 0, which would turn p / E into inf or nan.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return (probs / noise).argmax(dim=-1)
