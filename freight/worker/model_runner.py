"""ModelRunner: owns the model weights and the KV cache tensors, runs one step.

It takes a plain-data SchedulerOutput, keeps each request's state (token history,
generator, penalty counts, block table) in its persistent InputBatch, and returns a
plain-data ModelRunnerOutput. It never sees the scheduler's objects.

A step has two calls, as in vLLM: execute_model runs the forward and keeps the logits;
sample_tokens applies the grammar bitmask of constrained rows (which the engine core
fills while the forward runs) and samples.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch

from freight.distributed.parallel_state import get_tp_group
from freight.layers.attention import kv_cache_shape, needs_zeroed_cache
from freight.model_config import ModelConfig
from freight.step_contract import GrammarOutput, LogprobsLists, ModelRunnerOutput, SchedulerOutput
from freight.worker.bitmask import apply_token_bitmask
from freight.worker.input_batch import InputBatch, ModelInput, PromptRows, build_model_input
from freight.worker.request_state import CachedRequestState
from freight.worker.kv_prefault import prefault_in_background
from freight.worker.sampler import Sampler
from freight.worker.sampling_tensors import SamplingTensors

logger = logging.getLogger(__name__)


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, tensor_parallel_size: int = 1) -> int:
    """One block's K and V over all layers, on one rank."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.kv_heads_per_rank(tensor_parallel_size) * cfg.head_dim * elem


def _logprobs_lists(chosen: list[int], chosen_lp: list[float], top_ids, top_lps, ks: list[int]) -> LogprobsLists:
    """One row per position: the chosen token first, then its k best."""
    ids, lps = [], []
    for i, (tok, lp, k) in enumerate(zip(chosen, chosen_lp, ks)):
        ids.append([tok] + (top_ids[i][:k] if k > 0 else []))
        lps.append([lp] + (top_lps[i][:k] if k > 0 else []))
    return LogprobsLists(ids, lps)


class _Sample(NamedTuple):
    """One sampled position: the token, its logprob, and the top-k (when any row of the step asked)."""
    token: int
    logprob: float
    top_ids: Optional[list[int]]
    top_logprobs: Optional[list[float]]


def _row_offsets(sampling: list[CachedRequestState]) -> list[int]:
    """Where each request's sampled rows start in the logits: 1 + len(its drafts) rows each."""
    offsets, row = [], 0
    for s in sampling:
        offsets.append(row)
        row += 1 + len(s.spec_token_ids)
    return offsets


def _newest_block_id(out: SchedulerOutput) -> int:
    """The highest block id the step hands out (-1: none): only new blocks can raise the high-water mark."""
    return max([max(r.block_ids, default=-1) for r in out.scheduled_new_reqs]
               + [max(r.new_block_ids, default=-1) for r in out.scheduled_cached_reqs], default=-1)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 block_size: int, num_blocks: int, seed: int, max_num_seqs: int, max_model_len: int):
        self.model = model
        self.cfg = cfg
        self.device = device
        self.block_size = block_size
        kv_heads = cfg.kv_heads_per_rank(get_tp_group().world_size)  # this rank's
        shape = kv_cache_shape(kv_heads, num_blocks, block_size, cfg.head_dim)
        # Allocated empty (start-up stays fast, pages are touched only when used). The gathered
        # decode path (CUDA, no C compiler) reads whole blocks and masks the unused slots, but a
        # masked NaN from uninitialised memory would still poison its sum: there, blocks are
        # zeroed a range at a time on first use. The native kernels never read those slots.
        self.kv_caches = [(torch.empty(shape, dtype=dtype, device=device),
                           torch.empty(shape, dtype=dtype, device=device)) for _ in range(cfg.num_layers)]
        self._zeroed_blocks = 0  # blocks [0, this) have been zeroed
        self._zero_on_first_use = needs_zeroed_cache(dtype, device)
        self._kv_prefault = None if self._zero_on_first_use else prefault_in_background(
            [t for pair in self.kv_caches for t in pair])
        self.sampler = Sampler(seed, device)
        self.batch = InputBatch(max_num_seqs, -(-max_model_len // block_size), cfg.vocab_size, device)
        self._pending: Optional[tuple[Optional[torch.Tensor], Optional[ModelInput]]] = None
        self._pooled: dict[str, list[float]] = {}  # this step's finished pooling vectors

    def map_kv_cache(self, num_blocks: int) -> None:
        """Map the cache's first num_blocks blocks now, and stop mapping the rest in the background."""
        if self._kv_prefault is not None:
            self._kv_prefault.map_now(num_blocks)

    # -- the step -----------------------------------------------------------------
    def _zero_new_blocks(self, max_block_id: int) -> None:
        if max_block_id < self._zeroed_blocks:
            return
        # Zero ahead in chunks so a growing cache is not zeroed one block per step.
        end = min(max(max_block_id + 1, 2 * self._zeroed_blocks, 256), self.kv_caches[0][0].shape[1])
        for k, v in self.kv_caches:
            k[:, self._zeroed_blocks:end].zero_()
            v[:, self._zeroed_blocks:end].zero_()
        self._zeroed_blocks = end

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for k, v in self.kv_caches:
            k[:, dst] = k[:, src]
            v[:, dst] = v[:, src]

    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> None:
        """Run the step's forward; its logits wait for sample_tokens."""
        self.batch.update_states(out)
        if out.is_empty:
            self._pending = (None, None)
            return
        if self._zero_on_first_use:
            # (stale entries past a row's table are old block ids: at worst this zeroes ahead)
            self._zero_new_blocks(int(self.batch.block_table[:self.batch.num_reqs].max()))
        elif self._kv_prefault is not None:
            self._kv_prefault.need(_newest_block_id(out))
        if out.block_copies:
            self._copy_blocks(out.block_copies)
        inp = build_model_input(self.batch, out, self.block_size, self.device)
        # The model gives the final-normed hidden rows of logits_indices; the head runs on the logit rows
        # only (a pooling request's rows come after them and never reach it).
        hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.attn, inp.logits_indices)
        k = inp.num_logit_rows if inp.pooling_rows else hidden.shape[0]
        logits = self.model.compute_logits(hidden[:k]) if k else None
        if inp.pooling_rows:
            self._pool(hidden[k:], inp)
        self._pending = (logits, inp)

    def _pool(self, hidden: torch.Tensor, inp: ModelInput) -> None:
        """Accumulate (mean) or take (last token) each pooling request's rows; final vectors wait in
        self._pooled for sample_tokens."""
        row = 0
        for pr in inp.pooling_rows:
            s = pr.state
            part = hidden[row:row + pr.count].float()
            row += pr.count
            if s.error is not None:
                continue
            if s.pooling_params.pooling_type == "MEAN":
                if pr.first_position == 0:  # (re)started from the first token, e.g. after a preemption
                    s.pool_sum, s.pool_count = None, 0
                total = part.sum(dim=0)
                s.pool_sum = total if s.pool_sum is None else s.pool_sum + total
                s.pool_count += pr.count
                if not pr.final:
                    continue
                vec = s.pool_sum / s.pool_count
            else:
                vec = part[-1]
            p = s.pooling_params
            if p.dimensions is not None:
                vec = vec[:p.dimensions]
            if p.normalize:
                vec = torch.nn.functional.normalize(vec, p=2, dim=-1)
            self._pooled[s.req_id] = vec.tolist()

    @torch.inference_mode()
    def sample_tokens(self, grammar: Optional[GrammarOutput] = None) -> ModelRunnerOutput:
        if self._pending is None:
            raise RuntimeError("sample_tokens without a preceding execute_model")
        (logits, inp), self._pending = self._pending, None
        result = ModelRunnerOutput()
        if self._pooled:
            result.pooler_output, self._pooled = self._pooled, {}
        if inp is None:
            return result
        n = inp.num_sampled_rows
        offsets = _row_offsets(inp.sampling)
        constrained: list[int] = []
        if n and grammar is not None and grammar.req_ids:
            row_of = {s.req_id: i for i, s in enumerate(inp.sampling)}
            constrained = [row_of[rid] for rid in grammar.req_ids]
            # (constrained requests have no drafts: one row each)
            apply_token_bitmask(logits, grammar.array(), [offsets[i] for i in constrained])
        if n:
            self._sample(logits[:n], inp.sampling, offsets, result, constrained)
        if inp.prompt_rows:
            self._prompt_logprobs(logits[n:], inp, result)
        for state in self.batch.reqs[:self.batch.num_reqs]:
            if state.error is not None:
                result.failed[state.req_id] = state.error
        return result

    def _sample(self, logits: torch.Tensor, states: list[CachedRequestState], offsets: list[int],
                result: ModelRunnerOutput, constrained: list[int]) -> None:
        """Sample every request's row; a request with drafts samples its rows in turn, going on while
        the token sampled equals the draft fed at that position (speculative verification).

        Sampling and then comparing is exact for any sampling parameters: each token is drawn from
        the very distribution it would have had without drafts (penalties and min_tokens see the
        tokens accepted before it), and a seeded request draws from its generator once per token,
        as without speculation. Rejection is this draw landing elsewhere (probability 1 - p(draft)),
        which is the rejection sampler's residual for a deterministic drafter."""
        drafts = [s.spec_token_ids for s in states]
        picked: dict[int, list[_Sample]] = {i: [] for i, s in enumerate(states) if s.error is None}
        alive = list(picked)
        position = 0
        while alive:
            samples = self._sample_position(logits, states, alive, [offsets[i] + position for i in alive],
                                            constrained if position == 0 else [])
            for i, sample in zip(alive, samples):
                if sample is not None:
                    picked[i].append(sample)
            alive = [i for i in alive if states[i].error is None and position < len(drafts[i])
                     and picked[i][-1].token == drafts[i][position]]
            position += 1
        for i, samples in picked.items():
            s = states[i]
            if s.error is not None or not samples:
                continue
            s.fork_of = None
            result.req_ids.append(s.req_id)
            tokens, logprobs = [x.token for x in samples], [x.logprob for x in samples]
            result.sampled_token_ids.append(tokens)
            result.sampled_logprobs.append(logprobs)
            k = s.sampling_params.logprobs
            if k is not None:
                result.logprobs[s.req_id] = _logprobs_lists(tokens, logprobs, [x.top_ids for x in samples],
                                                            [x.top_logprobs for x in samples], [k] * len(samples))

    def _sample_position(self, logits: torch.Tensor, states: list[CachedRequestState], rows: list[int],
                         logit_rows: list[int], constrained: list[int]) -> list[Optional[_Sample]]:
        """One sample for each of rows (from its logits row), or None where that request's sampling failed
        (it alone fails; greedy rows give the same tokens)."""
        try:
            return self._sample_rows(logits, states, rows, logit_rows, constrained)
        except Exception:
            samples = []
            for i, r in zip(rows, logit_rows):
                try:
                    samples.extend(self._sample_rows(logits, states, [i], [r], constrained))
                except Exception as e:
                    logger.exception("sampling failed for request %s", states[i].req_id)
                    states[i].error = f"sampling failed: {type(e).__name__}: {e}"
                    samples.append(None)
            return samples

    def _sample_rows(self, logits: torch.Tensor, states: list[CachedRequestState], rows: list[int],
                     logit_rows: list[int], constrained: list[int]) -> list[_Sample]:
        """Sample the given rows; states change only once everything has succeeded."""
        picked = [states[i] for i in rows]
        st = SamplingTensors.from_requests(picked, [s.generator for s in picked], self.cfg.vocab_size, self.device)
        if st.banned is not None and constrained:
            # A constrained row's min_tokens ban is in its bitmask already, lifted where the
            # grammar allows nothing but a stop token.
            constrained_rows = set(constrained)
            exempt = [j for j, i in enumerate(rows) if i in constrained_rows]
            st.banned[exempt] = False
        whole = logit_rows == list(range(logits.shape[0]))
        so = self.sampler(logits if whole else logits[logit_rows], st)
        token_ids = get_tp_group().broadcast_from_rank0(so.token_ids).tolist()  # every rank feeds rank 0's
        logprobs = so.logprobs.tolist()
        top_ids = so.top_token_ids.tolist() if so.top_token_ids is not None else None
        top_lps = so.top_logprobs.tolist() if so.top_logprobs is not None else None
        for s, tok in zip(picked, token_ids):
            s.append_token(tok)
        return [_Sample(tok, logprobs[j], top_ids[j] if top_ids else None, top_lps[j] if top_lps else None)
                for j, tok in enumerate(token_ids)]

    def _prompt_logprobs(self, logits: torch.Tensor, inp: ModelInput, result: ModelRunnerOutput) -> None:
        lps = torch.log_softmax(logits.float(), dim=-1)
        row = 0
        for pr in inp.prompt_rows:
            ids = pr.state.prompt_token_ids
            part = lps[row:row + pr.count]
            row += pr.count
            if pr.state.error is not None:
                continue
            try:
                result.prompt_logprobs[pr.state.req_id] = self._prompt_logprobs_of(part, ids, pr)
            except Exception as e:
                logger.exception("prompt logprobs failed for request %s", pr.state.req_id)
                pr.state.error = f"prompt logprobs failed: {type(e).__name__}: {e}"

    def _prompt_logprobs_of(self, part: torch.Tensor, ids: list[int], pr: PromptRows) -> LogprobsLists:
        targets = torch.tensor(ids[pr.first_position + 1:pr.first_position + 1 + pr.count], device=self.device)
        chosen = part.gather(1, targets[:, None]).squeeze(1).tolist()
        k = pr.state.sampling_params.prompt_logprobs
        top_lp, top_ids = part.topk(k, dim=-1) if k > 0 else (None, None)
        return _logprobs_lists(targets.tolist(), chosen, top_ids.tolist() if k > 0 else None,
                               top_lp.tolist() if k > 0 else None, [k] * pr.count)
