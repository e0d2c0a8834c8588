"""Linear layers whose CPU weights are pre-packed for oneDNN (and, in bf16, for freight's kernel).

oneDNN reorders a weight into its blocked layout on every call unless it is packed
once ahead of time; for the small row counts of decode steps that reorder costs as
much as the multiply (packed: about 2x faster at 1-8 rows, 1.3x at 32, 1.1x at 2048
on an AVX-512 CPU). Packing uses PyTorch's mkldnn ops (the ones its own compiler
uses for frozen CPU models); if they are missing or disagree with F.linear, the
layer stays a plain nn.Linear. In bf16 on CPUs with AVX512_BF16 the weight is also
kept in kernels/gemm.c's layout for steps of a few rows (it costs a second copy of
the weights: the price of fast low-concurrency decode).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from freight.kernels.gemm import pack_weight, small_gemm, small_gemm_supported

logger = logging.getLogger(__name__)

_BATCH_HINT = 128  # rows the packed layout is tuned for; measured to do well from 1 to 2048 rows
# Up to this many rows freight's own kernel (kernels/gemm.c) beats oneDNN. Over all of bench-135m's
# layers (weights streamed from memory, as in a real step): 1.35x at 8 rows, 1.7x at 16, 1.3x at 32,
# 1.15x at 64, 1.03-1.1x from 128 to 512 rows (a 256-token prompt's prefill); about even beyond,
# where x no longer fits in L2 and oneDNN's blocking for large row counts pays.
SMALL_GEMM_MAX_ROWS = 512


def _mkldnn_ops():
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return ops._reorder_linear_weight, ops._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


class Linear(nn.Linear):
    _packed: Optional[torch.Tensor] = None
    _small: Optional[torch.Tensor] = None  # the weight in gemm.c's layout (bf16 CPU only)

    def pack_for_cpu(self, release_original: bool) -> bool:
        """Pack the weight for oneDNN; release_original frees the unpacked copy (not for tied weights)."""
        ops = _mkldnn_ops()
        w = self.weight
        if ops is None or w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
            return False
        reorder, linear = ops
        try:
            packed = reorder(w.detach(), _BATCH_HINT)
            x = torch.randn(3, w.shape[1], dtype=w.dtype)
            got = linear(x, packed, self.bias, "none", [], "")
            want = F.linear(x, w, self.bias)
            if not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item()):
                return False
        except RuntimeError as e:
            logger.debug("oneDNN weight packing unavailable: %s", e)
            return False
        self._packed = packed
        self._linear = linear
        if small_gemm_supported(w):
            self._small = pack_weight(w.detach())
        if release_original:
            self.weight.data = torch.empty(0, dtype=w.dtype)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._small is not None and x.dim() == 2 and x.shape[0] <= SMALL_GEMM_MAX_ROWS:
            y = small_gemm(x, self._small, self.out_features)
            if y is not None:
                return y if self.bias is None else y.add_(self.bias)
        if self._packed is not None:
            return self._linear(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def pack_linear_weights(model: nn.Module) -> int:
    """Pack every freight Linear of a CPU model; returns how many were packed."""
    tied = {id(p) for m in model.modules() if not isinstance(m, Linear) for p in m.parameters(recurse=False)}
    count = 0
    for m in model.modules():
        if isinstance(m, Linear):
            count += m.pack_for_cpu(release_original=id(m.weight) not in tied)
    return count
