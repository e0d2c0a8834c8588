"""Linear layers whose CPU weights are pre-packed for oneDNN (and, in bf16, for freight's kernel).

oneDNN reorders a weight into its blocked layout on every call unless it is packed
once ahead of time; for the small row counts of decode steps that reorder costs as
much as the multiply (packed: about 2x faster at 1-8 rows, 1.3x at 32, 1.1x at 2048
on an AVX-512 CPU). Packing uses PyTorch's mkldnn ops (the ones its own compiler
uses for frozen CPU models); if they are missing or disagree with F.linear, the
layer stays a plain nn.Linear. Where kernels/gemm.c has a kernel for the dtype and CPU
(bf16 with AVX512_BF16 or AVX2, fp32 with AVX2/AVX-512) the weight is also kept in its
layout for steps of a few rows (a second copy of the weights: the price of fast
low-concurrency decode; gemm.small_gemm_max_rows says how few).

With quantization="int8" the layers that allow it (`quantizable`: the attention and MLP
projections) hold an int8 weight instead (layers/quantization/int8.py) and are not packed.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from freight.kernels.gemm import pack_weight, small_gemm, small_gemm_supported
from freight.layers.quantization import check_quantization
from freight.layers.quantization.int8 import Int8Weight

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
    # Whether quantization may replace the weight: the projections of attention and the MLP say so
    # (parallel_linear.py); router gates and the LM head stay float (see quantize_linear_weights).
    quantizable = False
    _packed: Optional[torch.Tensor] = None
    _small: Optional[torch.Tensor] = None  # the weight in gemm.c's layout (where it has a kernel)
    _int8: Optional[Int8Weight] = None

    def quantize_int8(self) -> None:
        """Replace the float weight by its int8 form (this rank's shard, after loading)."""
        self._int8 = Int8Weight(self.weight)
        self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)

    def held_weight_bytes(self) -> int:
        """Bytes of the weight held outside self.weight (int8, or oneDNN-packed at its logical size)."""
        if self._int8 is not None:
            return self._int8.nbytes
        if self._packed is not None and self.weight.numel() == 0:
            return self.in_features * self.out_features * self.weight.element_size()
        return 0

    def pack_for_cpu(self, release_original: bool) -> bool:
        """Pack the weight for oneDNN, and for gemm.c's small-row kernel where it has one for this dtype
        and CPU; release_original frees the unpacked copy (not for tied weights, nor when oneDNN could
        not pack it: larger steps then need it). Returns whether anything was packed."""
        if self._int8 is not None or self.weight.device.type != "cpu":
            return False
        w = self.weight
        onednn = self._pack_onednn(w)
        if small_gemm_supported(w):
            # (also without oneDNN: on an AVX2 CPU it will not pack bf16, and this kernel is the fast path)
            self._small = pack_weight(w.detach())
        if onednn and release_original:
            self.weight.data = torch.empty(0, dtype=w.dtype)
        return onednn or self._small is not None

    def _pack_onednn(self, w: torch.Tensor) -> bool:
        ops = _mkldnn_ops()
        if ops is None or w.dtype not in (torch.float32, torch.bfloat16):
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
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._int8 is not None:
            return self._int8.matmul(x, self.bias)
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


def quantize_linear_weights(model: nn.Module, method: str) -> int:
    """Quantize every quantizable Linear of a loaded model (each rank its own shard); returns how many.

    Only the attention and MLP projections: the embedding and norms are not linear layers, and router
    gates are tiny and decide routing. The LM head stays float, as vLLM's methods leave it by default:
    its error lands on the logits unaveraged, and where it is tied to the embedding (most small models)
    an int8 copy adds memory. Alone it would be faster in int8 at decode (bench-135m's head at 1 row:
    1.5x in bf16, several x in fp32; docs/performance.md).
    """
    check_quantization(method)
    count = 0
    for m in model.modules():
        if isinstance(m, Linear) and m.quantizable:
            m.quantize_int8()
            count += 1
    return count
