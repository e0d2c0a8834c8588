"""RMSNorm, computed in float32 like Hugging Face's so outputs match to the token."""

from typing import Optional, Union

import torch
from torch import nn

from freight.kernels import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """norm(x); with a residual, (norm(x + residual), x + residual), the sum rounded to x's dtype
        first as in transformers' decoder layers. The fused CPU kernel adds into residual in place."""
        out = rms_norm(x, self.weight, self.eps, residual)
        if out is not None:
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
