"""Shared fixtures for freight's tests.

- HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are forced on: no test may touch the network.
- `shared_dir`: the repository's sibling `shared/` folder (tiny real models and
  tokenizers); tests that need it skip with a clear reason when it is missing.
- `stories_dir`: shared/models/stories260k, a real trained tiny Llama.
- `random_model`: builds (once per session) a seeded random-weight checkpoint of
  one of `model_factory.VARIANTS` and returns its folder.
- `make_llm`: constructs `freight.LLM` with small, test-friendly defaults.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# FREIGHT_SHARED_DIR points elsewhere (e.g. a copy carried to a GPU machine).
SHARED_DIR = Path(os.environ.get("FREIGHT_SHARED_DIR") or REPO_ROOT.parent / "shared")

if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


def _shared_or_skip() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared folder not found at {SHARED_DIR} (expected next to the repository root); "
                    "these tests need its tiny models")
    return SHARED_DIR


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _shared_or_skip()


@pytest.fixture(scope="session")
def stories_dir(shared_dir) -> Path:
    d = shared_dir / "models" / "stories260k"
    if not (d / "config.json").is_file():
        pytest.skip(f"stories260k model not found at {d}")
    return d


@pytest.fixture(scope="session")
def random_models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("random_models")


@pytest.fixture(scope="session")
def random_model(random_models_root):
    """random_model(name) -> folder of the seeded random checkpoint `name` (built once per session)."""
    from model_factory import make_variant

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = make_variant(random_models_root, name)
        return built[name]

    return get


# The models here are tiny: one torch thread is fastest and, on a shared 2-core
# machine, avoids OpenMP threads spinning against other processes (a 200-step
# run measured 0.4 s with 1 thread and 0.4-9 s with 2 under load).
# FREIGHT_TEST_THREADS overrides.
TEST_THREADS = int(os.environ.get("FREIGHT_TEST_THREADS", "1"))


def _limit_threads() -> None:
    import torch

    if TEST_THREADS > 0:
        torch.set_num_threads(TEST_THREADS)


_limit_threads()

# Defaults for engines under test: float32 so greedy output can be compared token for
# token with transformers; on the CPU unless FREIGHT_TEST_DEVICE names another (cuda).
LLM_DEFAULTS = dict(dtype="float32", device=os.environ.get("FREIGHT_TEST_DEVICE", "cpu"), block_size=16,
                    kv_cache_memory="64MiB", seed=0)


@pytest.fixture
def make_llm():
    """make_llm(model_dir, **overrides) -> freight.LLM with LLM_DEFAULTS."""
    created = []

    def make(model_dir, **overrides):
        from freight import LLM

        kw = dict(LLM_DEFAULTS)
        kw.update(overrides)
        llm = LLM(model=str(model_dir), **kw)
        _limit_threads()  # the engine sets torch's thread count to every core; undo that
        created.append(llm)
        return llm

    yield make
    for llm in created:
        shutdown = getattr(llm, "shutdown", None) or getattr(getattr(llm, "llm_engine", None), "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception:  # noqa: BLE001 - cleanup must not mask the test's result
                pass
    created.clear()


def _isa_levels():
    from freight.kernels.cpu_features import supported_isas

    return supported_isas()


@pytest.fixture(params=_isa_levels())
def isa(request, monkeypatch):
    """The kernels as built for one ISA level this CPU can run (FREIGHT_KERNEL_ISA), restored afterwards."""
    from freight.kernels.build import reset_kernel_caches

    monkeypatch.setenv("FREIGHT_KERNEL_ISA", request.param)
    reset_kernel_caches()
    yield request.param
    monkeypatch.undo()
    reset_kernel_caches()
