"""Paged attention over a block-organised KV cache, in plain PyTorch.

Each step's flat batch holds the decode tokens first (one per sequence, attended
in one batched call over their gathered blocks) and then the prefill chunks (one
call per sequence; a chunk with no earlier context attends only to itself and
never touches the cache's read path). New K/V are written in place through the
slot mapping before attention reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


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
    _masks: dict = field(default_factory=dict)  # (kind, window) -> mask, shared across layers

    def decode_mask(self, window: Optional[int], block_size: int) -> torch.Tensor:
        key = ("decode", window)
        if key not in self._masks:
            lens = self.decode_seq_lens
            kv_pos = torch.arange(self.decode_block_tables.shape[1] * block_size, device=lens.device)
            mask = kv_pos[None, :] < lens[:, None]
            if window is not None:
                mask &= kv_pos[None, :] > (lens[:, None] - 1 - window)
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, i: int, window: Optional[int], device) -> Optional[torch.Tensor]:
        """None means plain causal attention over the chunk itself."""
        chunk = self.prefills[i]
        if chunk.num_computed == 0 and window is None:
            return None
        key = ("prefill", i, window)
        if key not in self._masks:
            q_pos = torch.arange(chunk.num_computed, chunk.seq_len, device=device)
            kv_pos = torch.arange(chunk.seq_len, device=device)
            mask = kv_pos[None, :] <= q_pos[:, None]
            if window is not None:
                mask &= kv_pos[None, :] > (q_pos[:, None] - window)
            self._masks[key] = mask
        return self._masks[key]


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: Optional[int] = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.gqa = num_heads != num_kv_heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D]; kv_cache: two [num_blocks, block_size, Hkv, D]."""
        k_cache, v_cache = kv_cache
        block_size = k_cache.shape[1]
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, v)

        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta, block_size)
        for i, chunk in enumerate(meta.prefills):
            out[chunk.start:chunk.end] = self._prefill(q, k, v, k_cache, v_cache, meta, i, block_size)
        return out

    def _decode(self, q, k_cache, v_cache, meta, block_size):
        tables = meta.decode_block_tables
        b, nb = tables.shape
        keys = k_cache[tables].view(b, nb * block_size, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = v_cache[tables].view(b, nb * block_size, self.num_kv_heads, self.head_dim).transpose(1, 2)
        mask = meta.decode_mask(self.sliding_window, block_size)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask,
                                           scale=self.scale, enable_gqa=self.gqa)
        return o.squeeze(2)

    def _prefill(self, q, k, v, k_cache, v_cache, meta, i, block_size):
        chunk = meta.prefills[i]
        qs = q[chunk.start:chunk.end].transpose(0, 1)
        if chunk.num_computed == 0:
            keys = k[chunk.start:chunk.end].transpose(0, 1)
            values = v[chunk.start:chunk.end].transpose(0, 1)
        else:
            n = chunk.seq_len
            keys = k_cache[chunk.block_table].view(-1, self.num_kv_heads, self.head_dim)[:n].transpose(0, 1)
            values = v_cache[chunk.block_table].view(-1, self.num_kv_heads, self.head_dim)[:n].transpose(0, 1)
        mask = meta.prefill_mask(i, self.sliding_window, q.device)
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, is_causal=mask is None,
                                           scale=self.scale, enable_gqa=self.gqa)
        return o.transpose(0, 1)
