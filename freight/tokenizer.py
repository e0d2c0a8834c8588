"""Tokenizer loading (transformers' AutoTokenizer) and the end-of-sequence ids a model stops on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def load_tokenizer(path: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {type(e).__name__}: {e}") from e


def eos_token_ids(model_dir: Path, tokenizer) -> frozenset[int]:
    """The tokenizer's eos plus every eos id in generation_config.json (models often list several)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
    return frozenset(ids)
