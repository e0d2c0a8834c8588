"""PoolingParams: the parameters of a pooling (embedding) request, vLLM's name and fields.

`pooling_type` is not set by callers: the frontend resolves it from the model directory
(sentence-transformers files, see freight/pooling.py) before the request reaches the core.
"""

from __future__ import annotations

from typing import Optional

import msgspec


class PoolingParams(msgspec.Struct, omit_defaults=True):
    normalize: Optional[bool] = None     # L2-normalise the pooled vector (None: as the model declares)
    dimensions: Optional[int] = None     # Matryoshka truncation, where the model allows it
    pooling_type: Optional[str] = None   # "LAST" | "MEAN", resolved by the frontend

    def clone(self) -> "PoolingParams":
        return msgspec.structs.replace(self)
