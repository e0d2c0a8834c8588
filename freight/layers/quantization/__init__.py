"""Weight quantization freight applies to a float checkpoint as it loads it (`quantization=` / --quantization).

This module only names the methods (config validation imports it without torch); each method
lives in its own module (int8.py). Checkpoints that arrive already quantized (a
`quantization_config` in config.json) are a different thing and are refused by model_config.py.
"""

from __future__ import annotations

from typing import Optional

QUANTIZATION_METHODS = ("int8",)  # int8: weight-only, per-output-channel symmetric scales


def check_quantization(method: Optional[str]) -> None:
    if method is not None and method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization {method!r} is not supported; freight quantizes a float checkpoint on load "
                         f"with one of: {', '.join(QUANTIZATION_METHODS)} (or none: quantization=None)")
