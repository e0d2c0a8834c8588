"""InputBatch: the runner's persistent batch, and one step's flat model input built from it.

It keeps every request the scheduler has sent and not yet finished (CachedRequestState,
preempted ones too), applying each SchedulerOutput's diff in update_states(). Rows hold
the requests of the current step: a request keeps its row from step to
step, so its block table lives in a preallocated array that each step only appends
to (O(new blocks)), and the step's input is gathered from the rows with array ops
(O(new tokens), not O(context)). Requests leave rows (finished, preempted or simply
not scheduled this step) and join them; condense() keeps rows [0, num_reqs) dense.

Input layout: decodes (one token each) first, then prefill chunks, so attention can
handle all decodes in one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

import numpy as np
import torch

from freight.layers.attention import AttentionMetadata, PrefillChunk
from freight.sampling_params import SamplingParams
from freight.step_contract import NewRequestData, SchedulerOutput
from freight.worker.request_state import CachedRequestState
from freight.worker.sampling_tensors import TokenCounts


class InputBatch:
    def __init__(self, max_num_reqs: int, max_blocks_per_req: int, vocab_size: int,
                 device: torch.device = torch.device("cpu")):
        self.max_num_reqs = max_num_reqs
        self.vocab_size = vocab_size
        self.device = device
        self.requests: dict[str, CachedRequestState] = {}  # every unfinished request sent so far
        self.reqs: list[Optional[CachedRequestState]] = [None] * max_num_reqs
        self.req_index: dict[str, int] = {}
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int64)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        self._holes: list[int] = []  # free rows below num_rows, filled first (then condense)
        self.num_rows = 0            # rows [0, num_rows) are in use or holes

    # -- applying a step's diff --------------------------------------------------
    def update_states(self, out: SchedulerOutput) -> None:
        for rid in out.finished_req_ids:
            self.requests.pop(rid, None)
            self.remove(rid)
        # Rows of requests not in this step (preempted, or left out by the budget) are freed.
        for rid in [r for r in self.req_index if r not in out.num_scheduled_tokens]:
            self.remove(rid)
        for new in out.scheduled_new_reqs:
            try:
                state = self._new_state(new)
            except Exception as e:  # fail this request only (see CachedRequestState.error)
                state = CachedRequestState(new.req_id, new.prompt_token_ids, SamplingParams(), frozenset(),
                                           list(new.block_ids), new.num_computed_tokens, fork_of=new.parent_req_id,
                                           error=f"preparing the request failed: {type(e).__name__}: {e}")
            self.requests[new.req_id] = state
            self.add(state)
        for cached in out.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.num_computed_tokens = cached.num_computed_tokens
            state.spec_token_ids = out.scheduled_spec_decode_tokens.get(cached.req_id, [])
            if cached.reset_block_ids:
                state.block_ids = list(cached.new_block_ids)
            else:
                state.block_ids.extend(cached.new_block_ids)
            row = self.req_index.get(cached.req_id)
            if row is None:
                self.add(state)
            elif cached.reset_block_ids:
                self.set_block_ids(row, state.block_ids)
            elif cached.new_block_ids:
                self.append_block_ids(row, cached.new_block_ids)
        self.condense()

    def _new_state(self, new: NewRequestData) -> CachedRequestState:
        params = new.sampling_params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        state = CachedRequestState(new.req_id, new.prompt_token_ids, params, frozenset(new.eos_token_ids),
                                   list(new.block_ids), new.num_computed_tokens, generator,
                                   fork_of=new.parent_req_id, pooling_params=new.pooling_params)
        if new.parent_req_id is not None:  # its prompt's logprobs went with the parent
            state.num_prompt_logprobs_done = len(new.prompt_token_ids)
        if params.uses_penalties:
            state.token_counts = TokenCounts(state.prompt_token_ids, [], self.vocab_size, self.device)
        return state

    # -- rows -------------------------------------------------------------------------
    @property
    def num_reqs(self) -> int:
        return len(self.req_index)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.req_index

    def add(self, state: CachedRequestState) -> int:
        if state.req_id in self.req_index:
            raise ValueError(f"request {state.req_id!r} already has a row")
        if self._holes:
            row = self._holes.pop()
        else:
            if self.num_rows == self.max_num_reqs:
                raise RuntimeError(f"the batch holds at most {self.max_num_reqs} requests")
            row = self.num_rows
            self.num_rows += 1
        self.reqs[row] = state
        self.req_index[state.req_id] = row
        self.set_block_ids(row, state.block_ids)
        return row

    def remove(self, req_id: str) -> Optional[int]:
        """Free the request's row (a hole until condense()); None if it has none."""
        row = self.req_index.pop(req_id, None)
        if row is not None:
            self.reqs[row] = None
            self._holes.append(row)
        return row

    def condense(self) -> None:
        """Move the last rows into the holes so rows [0, num_reqs) hold every request."""
        holes = sorted(h for h in self._holes if h < self.num_reqs)
        self._holes = []
        last = self.num_rows - 1
        for hole in holes:
            while self.reqs[last] is None:
                last -= 1
            self._move(last, hole)
            last -= 1
        self.num_rows = self.num_reqs

    def _move(self, src: int, dst: int) -> None:
        state = self.reqs[src]
        self.reqs[dst], self.reqs[src] = state, None
        self.req_index[state.req_id] = dst
        n = self.num_blocks[src]
        self.block_table[dst, :n] = self.block_table[src, :n]
        self.num_blocks[dst] = n

    def set_block_ids(self, row: int, block_ids: list[int]) -> None:
        self.block_table[row, :len(block_ids)] = block_ids
        self.num_blocks[row] = len(block_ids)

    def append_block_ids(self, row: int, block_ids: list[int]) -> None:
        n = self.num_blocks[row]
        self.block_table[row, n:n + len(block_ids)] = block_ids
        self.num_blocks[row] = n + len(block_ids)


@dataclass
class PromptRows:
    state: CachedRequestState
    first_position: int   # position of the first row; its logits score the token after it
    count: int            # rows (consecutive in logits after the sampled rows)


@dataclass
class PoolingRows:
    state: CachedRequestState
    first_position: int   # prompt position of the first row
    count: int            # rows (consecutive in the hidden rows, after the logit rows)
    final: bool           # this step completes the prompt: the vector goes out


@dataclass
class ModelInput:
    input_ids: torch.Tensor       # [T]
    positions: torch.Tensor       # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # rows whose logits are needed: first the sampled rows, then prompt rows
    # The request of each sampled row group (forks repeat their parent's row): 1 + len(its drafts) rows each.
    sampling: list[CachedRequestState]
    prompt_rows: list[PromptRows]  # requests that want prompt logprobs, and where their rows are
    # Pooling requests' hidden rows, after every logit row (logits_indices[num_logit_rows:]):
    # the last prompt row (last-token pooling) or all of this chunk's rows (mean pooling).
    pooling_rows: list[PoolingRows] = field(default_factory=list)
    num_logit_rows: int = -1      # -1: every row of logits_indices
    num_sampled_rows: int = 0     # logits rows of `sampling` (the prompt-logprob rows follow)


def build_model_input(batch: InputBatch, out: SchedulerOutput, block_size: int,
                      device: torch.device) -> ModelInput:
    """The flat input of a step whose requests all have rows in `batch` (condensed)."""
    states = batch.reqs[:batch.num_reqs]
    num_sched = out.num_scheduled_tokens
    n_all = np.fromiter((num_sched[s.req_id] for s in states), dtype=np.int64, count=len(states))
    # Decodes, then prefill chunks, then forks (no tokens of their own); stable within each.
    kind = np.where(n_all == 1, 0, np.where(n_all > 1, 1, 2))
    order = np.argsort(kind, kind="stable")
    order = order[kind[order] < 2]
    sched = [states[i] for i in order]
    n = n_all[order]
    c = np.fromiter((s.num_computed_tokens for s in sched), dtype=np.int64, count=len(sched))
    total = int(n.sum())
    ends = np.cumsum(n)
    starts = ends - n

    ids = np.fromiter(chain.from_iterable(
        s.input_token_ids(s.num_computed_tokens, k) for s, k in zip(sched, n.tolist())),
        dtype=np.int64, count=total)
    positions = np.arange(total, dtype=np.int64) - np.repeat(starts - c, n)

    max_blocks = int(batch.num_blocks[order].max())
    tables = batch.block_table[order, :max_blocks]
    rows = np.repeat(np.arange(len(sched)), n)
    slots = tables[rows, positions // block_size] * block_size + positions % block_size

    num_decodes = int(np.searchsorted(n > 1, True))  # n > 1 is sorted False..True
    to_t = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
    decode_tables = decode_lens = None
    if num_decodes:
        width = -(-int(c[:num_decodes].max() + 1) // block_size)
        decode_tables = to_t(np.ascontiguousarray(tables[:num_decodes, :width]))
        decode_lens = to_t(c[:num_decodes] + 1)
    prefills, prefill_tables, prefill_rows = [], None, None
    if num_decodes < len(sched):
        prefill_tables = to_t(np.ascontiguousarray(tables[num_decodes:]))
        prefill_rows = to_t(np.stack([starts, n, c], axis=1)[num_decodes:].copy())
    for i in range(num_decodes, len(sched)):
        table = None
        if c[i] > 0:  # its row of prefill_tables, cut to the blocks it covers (a view: no second copy)
            table = prefill_tables[i - num_decodes, :-(-int(c[i] + n[i]) // block_size)]
        prefills.append(PrefillChunk(int(starts[i]), int(ends[i]), int(c[i]), table))

    # A row samples when this step reaches its request's last token (and its drafts, one row each);
    # forks take their parent's row.
    sampling, logit_rows, last_row = [], [], {}
    for i, s in enumerate(sched):
        num_drafts = len(s.spec_token_ids)
        if c[i] + n[i] == s.num_tokens + num_drafts and s.pooling_params is None:
            last_row[s.req_id] = int(ends[i]) - 1 - num_drafts
            sampling.append(s)
            logit_rows.extend(range(last_row[s.req_id], int(ends[i])))
    for s in states:
        parent = s.fork_of
        if parent is not None and num_sched[s.req_id] == 0:
            sampling.append(s)
            logit_rows.append(last_row[parent])
    num_sampled_rows = len(logit_rows)
    prompt_rows = []
    for i, s in enumerate(sched):
        if s.sampling_params.prompt_logprobs is None:
            continue
        # Rows at positions p < prompt_len - 1 score prompt token p + 1.
        first = max(int(c[i]), s.num_prompt_logprobs_done)
        last = min(int(c[i] + n[i]), len(s.prompt_token_ids) - 1)
        if last > first:
            prompt_rows.append(PromptRows(s, first, last - first))
            row0 = int(starts[i]) + first - int(c[i])
            logit_rows.extend(range(row0, row0 + last - first))
            s.num_prompt_logprobs_done = last
    num_logit_rows = len(logit_rows)
    pooling_rows = []
    for i, s in enumerate(sched):
        if s.pooling_params is None:
            continue
        final = bool(c[i] + n[i] == s.num_tokens)
        if s.pooling_params.pooling_type == "MEAN":
            first, count = int(c[i]), int(n[i])
        elif final:
            first, count = s.num_tokens - 1, 1
        else:
            continue
        row0 = int(starts[i]) + first - int(c[i])
        pooling_rows.append(PoolingRows(s, first, count, final))
        logit_rows.extend(range(row0, row0 + count))
    return ModelInput(
        input_ids=to_t(ids),
        positions=to_t(positions),
        attn=AttentionMetadata(slot_mapping=to_t(slots), num_decodes=num_decodes,
                               decode_block_tables=decode_tables, decode_seq_lens=decode_lens, prefills=prefills,
                               prefill_block_tables=prefill_tables, prefill_rows=prefill_rows),
        logits_indices=to_t(np.asarray(logit_rows, dtype=np.int64)),
        sampling=sampling,
        prompt_rows=prompt_rows,
        pooling_rows=pooling_rows,
        num_logit_rows=num_logit_rows,
        num_sampled_rows=num_sampled_rows,
    )
