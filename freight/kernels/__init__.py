"""Native CPU kernels, compiled on first use (see build.py).

Every wrapper has an `*_available` check or returns None when it cannot run (not a
CPU tensor, an unsupported dtype or layout, no C compiler): callers then use their
PyTorch implementation, which is also what runs on CUDA.
"""

from freight.kernels.attention import (paged_decode_attention, paged_decode_available, paged_prefill_attention,
                                      paged_prefill_available)
from freight.kernels.elementwise import rms_norm, rotary_inplace, silu_and_mul

__all__ = ["paged_decode_attention", "paged_decode_available", "paged_prefill_attention", "paged_prefill_available",
           "rms_norm", "rotary_inplace", "silu_and_mul"]
