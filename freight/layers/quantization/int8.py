"""int8 weight-only quantization: per-output-channel symmetric scales, float activations.

Each output channel (row of W [N, K]) gets scale = max|w_row| / 127 and q = round(w / scale) in
[-127, 127], so W ~= scale[:, None] * q with no zero point; the activations stay float. A decode
step streams every weight from memory once, so reading int8 instead of bf16 (fp32) halves
(quarters) the bytes. On CPU kernels/int8_gemm.c runs every row count: measured on bench-135m's
shapes (docs/performance.md, "int8 weights") it beat both dequantizing per call + oneDNN (from 1 to
256 rows; about even at 1024) and PyTorch's torch._weight_int8pack_mm (at every row count).
Without the C kernel (FREIGHT_DISABLE_C_KERNELS=1, no compiler, the generic build) and on CUDA the
weight is dequantized to x's dtype for each call and F.linear runs: memory is saved, speed is not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from freight.kernels.int8_gemm import int8_gemm, int8_gemm_available, pack_int8_weight


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 [N, K], float32 scales [N]) with w ~= scales[:, None] * q."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row: q = 0 whatever the scale
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight an int8 one stands for (computed in float32, then cast)."""
    return (q.float() * scales[:, None]).to(dtype)


class Int8Weight:
    """A linear layer's weight held as int8 + float32 scales, in the C kernel's layout when it runs here."""

    def __init__(self, w: torch.Tensor):
        q, self.scales = quantize_per_channel(w)
        self.out_features, self.in_features = q.shape
        use_kernel = w.device.type == "cpu" and int8_gemm_available()
        # one copy only: the kernel's packed layout, or the plain [N, K] matrix the fallback reads
        self.packed = pack_int8_weight(q) if use_kernel else None
        self.q = None if use_kernel else q

    @property
    def nbytes(self) -> int:
        data = self.packed if self.packed is not None else self.q
        return data.numel() * data.element_size() + self.scales.numel() * self.scales.element_size()

    def int8_matrix(self) -> torch.Tensor:
        """q as [N, K] int8 (a copy when the weight is held packed)."""
        if self.q is not None:
            return self.q
        return self.packed.permute(0, 2, 1).reshape(-1, self.in_features)[:self.out_features]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.int8_matrix(), self.scales, dtype)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., K] @ (scales * q)^T + bias -> [..., N] in x's dtype."""
        if self.packed is not None:
            y = int8_gemm(x.reshape(-1, self.in_features), self.packed, self.scales, self.out_features)
            if y is not None:
                y = y.view(*x.shape[:-1], self.out_features)
                return y if bias is None else y.add_(bias)
        return F.linear(x, self.dequantized(x.dtype), bias)
