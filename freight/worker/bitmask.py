"""Applying a grammar's token bitmask to the logits of the constrained rows.

The bitmask arrives as int32 words (bit t % 32 of word t // 32 = token t allowed). On
CPU a small C kernel (freight/kernels/bitmask.c) masks the rows in place; elsewhere, or
without a compiler, the bits are unpacked with numpy (little-endian bytes, one byte per
token) and added as a 0 / -inf penalty.
"""

from __future__ import annotations

import numpy as np
import torch

from freight.kernels.bitmask import apply_bitmask


def unpack_bitmask(bitmask: np.ndarray, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab_size]: which tokens each row allows."""
    allowed = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=1, bitorder="little")
    return torch.from_numpy(allowed[:, :vocab_size]).view(torch.bool)


def apply_token_bitmask(logits: torch.Tensor, bitmask: np.ndarray, rows: list[int]) -> None:
    """Set to -inf, in place, the logits of tokens the bitmask forbids in the given rows."""
    if apply_bitmask(logits, bitmask, rows):
        return
    allowed = unpack_bitmask(bitmask, logits.shape[1]).to(logits.device, non_blocking=True)
    # 0 where allowed, -inf where not: (allowed - 1) * 2 * max overflows to -inf without a NaN, and
    # adding it is several times faster than masked_fill on the CPU.
    penalty = allowed.to(logits.dtype).sub_(1).mul_(torch.finfo(logits.dtype).max).mul_(2)
    if rows == list(range(len(rows))):
        logits[:len(rows)].add_(penalty)
    else:
        logits.index_add_(0, torch.tensor(rows, device=logits.device), penalty)
