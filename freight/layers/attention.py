"""Paged attention over a block-organised KV cache, in plain PyTorch.

Cache layout, per layer, for K and for V: [num_kv_heads, num_blocks, block_size, head_dim].
Keeping the head dimension outermost means that gathering a batch's blocks with one
index_select gives a contiguous [kv_heads, batch, seq, head_dim] tensor that batched
matmuls read directly: no per-layer transposes or GQA head expansion.

Each step's flat batch holds the decode tokens first (one per sequence, attended in
one batched call over their gathered blocks) and then the prefill chunks. New K/V
are written in place through the slot mapping before attention reads them. On CPUs
with bf16 support, native kernels read the cache in place for both (all of a step's
prefill chunks in one call); elsewhere a chunk is one SDPA call (a chunk with no
earlier context attends only to itself and never touches the cache's read path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from freight.kernels import (paged_decode_attention, paged_decode_available, paged_prefill_attention,
                             paged_prefill_available)


@dataclass
class PrefillChunk:
    start: int          # first row of this chunk in the flat batch
    end: int            # one past its last row
    num_computed: int   # tokens of this sequence already in the cache before the chunk
    block_table: Optional[torch.Tensor]  # [num_blocks] ids; None when num_computed == 0

    @property
    def seq_len(self) -> int:
        return self.num_computed + self.end - self.start


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner and shared by every layer."""

    slot_mapping: torch.Tensor                  # [num_tokens] cache slot of each new token
    num_decodes: int                            # rows [0, num_decodes) are single-token decodes
    decode_block_tables: Optional[torch.Tensor]  # [num_decodes, max_blocks]
    decode_seq_lens: Optional[torch.Tensor]     # [num_decodes]
    prefills: list[PrefillChunk]
    prefill_block_tables: Optional[torch.Tensor] = None  # [len(prefills), max_blocks], for the native kernel
    prefill_rows: Optional[torch.Tensor] = None  # [len(prefills), 3]: start, end - start, num_computed
    _cache: dict = field(default_factory=dict)  # masks and gather buffers, shared across layers

    def decode_bias(self, window: Optional[int], block_size: int) -> torch.Tensor:
        """[num_decodes, 1, max_blocks * block_size] float: 0 where a key is visible, -inf elsewhere."""
        key = ("decode", window)
        if key not in self._cache:
            lens = self.decode_seq_lens
            kv_pos = torch.arange(self.decode_block_tables.shape[1] * block_size, device=lens.device)
            visible = kv_pos[None, :] < lens[:, None]
            if window is not None:
                visible &= kv_pos[None, :] > (lens[:, None] - 1 - window)
            bias = torch.zeros(visible.shape, dtype=torch.float32, device=lens.device)
            self._cache[key] = bias.masked_fill_(~visible, float("-inf"))[:, None, :]
        return self._cache[key]

    def decode_gather_buffers(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reused by every layer: allocating a fresh multi-MB tensor per layer costs page faults."""
        if "gather" not in self._cache:
            heads, _, block_size, dim = cache.shape
            n = self.decode_block_tables.numel()
            self._cache["gather"] = tuple(cache.new_empty(heads, n, block_size, dim) for _ in range(2))
        return self._cache["gather"]

    def prefill_mask(self, i: int, window: Optional[int], device) -> Optional[torch.Tensor]:
        """None means plain causal attention over the chunk itself."""
        chunk = self.prefills[i]
        if chunk.num_computed == 0 and window is None:
            return None
        key = ("prefill", i, window)
        if key not in self._cache:
            q_pos = torch.arange(chunk.num_computed, chunk.seq_len, device=device)
            kv_pos = torch.arange(chunk.seq_len, device=device)
            mask = kv_pos[None, :] <= q_pos[:, None]
            if window is not None:
                mask &= kv_pos[None, :] > (q_pos[:, None] - window)
            self._cache[key] = mask
        return self._cache[key]


def kv_cache_shape(num_kv_heads: int, num_blocks: int, block_size: int, head_dim: int) -> tuple[int, ...]:
    return (num_kv_heads, num_blocks, block_size, head_dim)


def needs_zeroed_cache(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether decode takes the gathered path, which reads whole blocks, unwritten slots included."""
    return not paged_decode_available(torch.empty(0, dtype=dtype, device=device))


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: Optional[int] = None, logit_softcap: Optional[float] = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        # Gemma 2: scores = cap * tanh(scores / cap) before the mask. Neither the C kernels nor SDPA can
        # do it, so a soft-capped layer takes the explicit PyTorch paths for decode and prefill.
        self.logit_softcap = logit_softcap
        self.gqa = num_heads != num_kv_heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D]; kv_cache: two [Hkv, num_blocks, block_size, D]."""
        k_cache, v_cache = kv_cache
        heads, _, block_size, dim = k_cache.shape
        k_cache.view(heads, -1, dim).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.view(heads, -1, dim).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))

        nd = meta.num_decodes
        if not meta.prefills:
            return self._decode(q, k_cache, v_cache, meta, block_size)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta, block_size)
        if self.logit_softcap is not None:
            for i, chunk in enumerate(meta.prefills):
                out[chunk.start:chunk.end] = self._prefill_explicit(q, k, v, k_cache, v_cache, meta, i)
            return out
        if meta.prefill_rows is not None and paged_prefill_available(q, k_cache):
            paged_prefill_attention(q, k_cache, v_cache, meta.prefill_block_tables, meta.prefill_rows, out,
                                    self.scale, self.sliding_window)
            return out
        for i, chunk in enumerate(meta.prefills):
            out[chunk.start:chunk.end] = self._prefill(q, k, v, k_cache, v_cache, meta, i, block_size)
        return out

    def _decode(self, q, k_cache, v_cache, meta, block_size):
        """One query per sequence against its blocks.

        On CPU the native kernel reads the blocks in place. Elsewhere (CUDA, or no C
        compiler) the blocks are gathered and attended with two batched matmuls.
        """
        if self.logit_softcap is not None:
            return self._decode_gathered(q, k_cache, v_cache, meta, block_size)
        if paged_decode_available(q):
            return paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens,
                                          self.scale, self.sliding_window)
        return self._decode_gathered(q, k_cache, v_cache, meta, block_size)

    def _decode_gathered(self, q, k_cache, v_cache, meta, block_size):
        """Softmax in float32; SDPA's CPU kernels are slow for a single query row."""
        tables = meta.decode_block_tables
        b, nb = tables.shape
        heads, dim = self.num_kv_heads, self.head_dim
        k_buf, v_buf = meta.decode_gather_buffers(k_cache)
        flat = tables.view(-1)
        keys = torch.index_select(k_cache, 1, flat, out=k_buf).view(heads, b, nb * block_size, dim)
        values = torch.index_select(v_cache, 1, flat, out=v_buf).view(heads, b, nb * block_size, dim)
        qh = q.view(b, heads, self.group, dim).transpose(0, 1)                 # [Hkv, b, g, D]
        scores = torch.matmul(qh, keys.transpose(-1, -2)).float()              # [Hkv, b, g, S]
        bias = meta.decode_bias(self.sliding_window, block_size)
        if self.logit_softcap is not None:
            cap = self.logit_softcap
            scores = torch.tanh(scores.mul_(self.scale).div_(cap)).mul_(cap)
            # The cache may be uninitialised (not zeroed) where the native kernels exist: slots
            # past a sequence's length are masked out of the scores and zeroed in the values.
            hidden = torch.isinf(bias)                                         # [b, 1, S]
            scores = scores.masked_fill_(hidden, float("-inf"))
            values = values.masked_fill_(hidden.view(1, b, -1, 1), 0)
        else:
            scores = scores.mul_(self.scale).add_(bias)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        o = torch.matmul(probs, values)                                        # [Hkv, b, g, D]
        return o.transpose(0, 1).reshape(b, self.num_heads, dim)

    def _prefill(self, q, k, v, k_cache, v_cache, meta, i, block_size):
        chunk = meta.prefills[i]
        # 4-D inputs: SDPA's fused CPU kernel takes them; 3-D ones fall back to the slow math path.
        qs = q[chunk.start:chunk.end].transpose(0, 1)[None]
        if chunk.num_computed == 0:
            keys = k[chunk.start:chunk.end].transpose(0, 1)[None]
            values = v[chunk.start:chunk.end].transpose(0, 1)[None]
        else:
            n, heads, dim = chunk.seq_len, self.num_kv_heads, self.head_dim
            keys = k_cache.index_select(1, chunk.block_table).view(heads, -1, dim)[None, :, :n]
            values = v_cache.index_select(1, chunk.block_table).view(heads, -1, dim)[None, :, :n]
        mask = meta.prefill_mask(i, self.sliding_window, q.device)
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, is_causal=mask is None,
                                           scale=self.scale, enable_gqa=self.gqa)
        return o[0].transpose(0, 1)

    def _prefill_explicit(self, q, k, v, k_cache, v_cache, meta, i):
        """One chunk with the scores computed explicitly (scale, soft-cap, mask, float32 softmax)."""
        chunk = meta.prefills[i]
        t, heads, dim = chunk.end - chunk.start, self.num_kv_heads, self.head_dim
        if chunk.num_computed == 0:
            keys = k[chunk.start:chunk.end].transpose(0, 1)                   # [Hkv, S, D]
            values = v[chunk.start:chunk.end].transpose(0, 1)
        else:
            n = chunk.seq_len
            keys = k_cache.index_select(1, chunk.block_table).view(heads, -1, dim)[:, :n]
            values = v_cache.index_select(1, chunk.block_table).view(heads, -1, dim)[:, :n]
        qh = q[chunk.start:chunk.end].view(t, heads, self.group, dim).permute(1, 2, 0, 3)  # [Hkv, g, T, D]
        scores = torch.matmul(qh, keys.transpose(-1, -2)[:, None]).float()    # [Hkv, g, T, S]
        scores = scores.mul_(self.scale)
        if self.logit_softcap is not None:
            cap = self.logit_softcap
            scores = torch.tanh(scores.div_(cap)).mul_(cap)
        mask = meta.prefill_mask(i, self.sliding_window, q.device)
        if mask is None:  # plain causal over the chunk itself
            mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril_()
        scores = scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        o = torch.matmul(probs, values[:, None])                               # [Hkv, g, T, D]
        return o.permute(2, 0, 1, 3).reshape(t, self.num_heads, dim)
