"""Where freight's bundled default model lives.

``freight/default_model/`` holds a tiny Llama-architecture model trained by
``scripts/train_default_model.py`` on the Python standard library's own sources,
so that ``freight serve`` and ``LLM()`` work with no model argument and no network.
See its README.md (the model card) for data, size and held-out loss.
"""

from __future__ import annotations

from pathlib import Path

_DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def default_model_path() -> str:
    """Absolute path of the bundled model directory (a standard Hugging Face folder)."""
    if not (_DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"freight's bundled default model is missing from {_DEFAULT_MODEL_DIR} "
            "(a broken install?); pass a model explicitly, or rebuild it with "
            "`python scripts/train_default_model.py --out freight/default_model`"
        )
    return str(_DEFAULT_MODEL_DIR)
