"""How a decoder model pools its hidden states into an embedding, read from its directory.

Qwen3-Embedding-style directories declare it with sentence-transformers files: a
`modules.json` listing a `sentence_transformers.models.Pooling` module (its folder's
`config.json` has `pooling_mode_lasttoken` / `pooling_mode_mean_tokens`) and, when the
vectors are L2-normalised, a `sentence_transformers.models.Normalize` module. Without
those files: last-token pooling, normalised. Matryoshka dimensions (whether `dimensions`
may truncate the vector) come from config.json (`matryoshka_dimensions`,
`is_matryoshka`) or `config_sentence_transformers.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from freight.pooling_params import PoolingParams


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: str = "LAST"               # "LAST" | "MEAN"
    normalize: bool = True
    is_matryoshka: bool = False
    matryoshka_dimensions: Optional[tuple[int, ...]] = None  # None with is_matryoshka: any size up to hidden
    hidden_size: int = 0


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load_pooler_config(model_dir, hidden_size: int = 0) -> PoolerConfig:
    root = Path(model_dir)
    pooling_type, normalize = "LAST", True
    modules = root / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text())
        except ValueError:
            entries = []
        normalize = False
        for m in entries:
            kind = m.get("type", "")
            if kind.endswith("models.Pooling"):
                pc = _read(root / m.get("path", "") / "config.json")
                if pc.get("pooling_mode_mean_tokens"):
                    pooling_type = "MEAN"
                elif pc.get("pooling_mode_lasttoken"):
                    pooling_type = "LAST"
                elif any(pc.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                             "pooling_mode_weightedmean_tokens")):
                    raise ValueError(f"unsupported sentence-transformers pooling in {model_dir}: {pc}")
            elif kind.endswith("models.Normalize"):
                normalize = True
    cfg = _read(root / "config.json")
    st = _read(root / "config_sentence_transformers.json")
    dims = cfg.get("matryoshka_dimensions") or st.get("matryoshka_dimensions")
    is_matryoshka = bool(cfg.get("is_matryoshka") or st.get("is_matryoshka") or dims)
    return PoolerConfig(pooling_type, normalize, is_matryoshka, tuple(dims) if dims else None,
                        hidden_size or int(cfg.get("hidden_size", 0)))


def resolve_pooling_params(params: Optional[PoolingParams], pooler: PoolerConfig) -> PoolingParams:
    """A copy of params with pooling_type and normalize filled in; ValueError for dimensions the model lacks."""
    p = PoolingParams() if params is None else params.clone()
    if p.dimensions is not None:
        if not pooler.is_matryoshka:
            raise ValueError("this model does not support matryoshka representation: "
                             "'dimensions' cannot be set")
        allowed = pooler.matryoshka_dimensions
        if p.dimensions < 1 or (allowed and p.dimensions not in allowed) or (
                pooler.hidden_size and p.dimensions > pooler.hidden_size):
            raise ValueError(f"dimensions={p.dimensions} is not supported by this model"
                             + (f" (supported: {list(allowed)})" if allowed else ""))
    p.pooling_type = pooler.pooling_type
    if p.normalize is None:
        p.normalize = pooler.normalize
    return p
