"""Builds one step's flat model input from the scheduler's decision, with array ops.

Layout: decodes (one token each) first, then prefill chunks, so attention can
handle all decodes in one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from freight.core.request import Request
from freight.core.scheduler import SchedulerOutput
from freight.layers.attention import AttentionMetadata, PrefillChunk


@dataclass
class PromptRows:
    request: Request
    first_position: int   # position of the first row; its logits score the token after it
    count: int            # rows (consecutive in logits after the sampled rows)


@dataclass
class ModelInput:
    input_ids: torch.Tensor       # [T]
    positions: torch.Tensor       # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # rows whose logits are needed: first the sampled rows, then prompt rows
    sampling: list[Request]       # the sequence each sampled row is for (forks repeat their parent's row)
    prompt_rows: list[PromptRows]  # requests that want prompt logprobs, and where their rows are


def build_model_input(out: SchedulerOutput, block_size: int, device: torch.device) -> ModelInput:
    sched = sorted(out.scheduled, key=lambda s: s.num_new_tokens > 1)  # stable: decodes first
    n = np.fromiter((s.num_new_tokens for s in sched), dtype=np.int64, count=len(sched))
    c = np.fromiter((s.num_computed_tokens for s in sched), dtype=np.int64, count=len(sched))
    total = int(n.sum())
    ends = np.cumsum(n)
    starts = ends - n

    ids = np.fromiter(chain.from_iterable(
        s.request.all_token_ids[s.num_computed_tokens:s.num_computed_tokens + s.num_new_tokens] for s in sched),
        dtype=np.int64, count=total)
    positions = np.arange(total, dtype=np.int64) - np.repeat(starts - c, n)

    max_blocks = max(len(s.block_ids) for s in sched)
    tables = np.zeros((len(sched), max_blocks), dtype=np.int64)
    for i, s in enumerate(sched):
        tables[i, :len(s.block_ids)] = s.block_ids
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

    sampling, rows = [], []
    for i, s in enumerate(sched):
        for seq in s.sampled_requests:
            sampling.append(seq)
            rows.append(int(ends[i]) - 1)
    prompt_rows = []
    for i, s in enumerate(sched):
        req = s.request
        if req.sampling_params.prompt_logprobs is None:
            continue
        # Rows at positions p < prompt_len - 1 score prompt token p + 1.
        first = max(s.num_computed_tokens, req.num_prompt_logprobs_done)
        last = min(s.num_computed_tokens + s.num_new_tokens, req.num_prompt_tokens - 1)
        if last > first:
            prompt_rows.append(PromptRows(req, first, last - first))
            row0 = int(starts[i]) + first - s.num_computed_tokens
            rows.extend(range(row0, row0 + last - first))
            req.num_prompt_logprobs_done = last
    return ModelInput(
        input_ids=to_t(ids),
        positions=to_t(positions),
        attn=AttentionMetadata(slot_mapping=to_t(slots), num_decodes=num_decodes,
                               decode_block_tables=decode_tables, decode_seq_lens=decode_lens, prefills=prefills,
                               prefill_block_tables=prefill_tables, prefill_rows=prefill_rows),
        logits_indices=to_t(np.asarray(rows, dtype=np.int64)),
        sampling=sampling,
        prompt_rows=prompt_rows,
    )
