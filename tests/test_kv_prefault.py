"""The KV-cache prefault thread maps pages without changing what the engine wrote."""

import time

import pytest
import torch

from freight.worker import kv_prefault


def _started(heads: int, blocks: int):
    """(caches with random contents, their copies, the started prefault); skips where there is none."""
    caches = [torch.randn(heads, blocks, 16, 64).to(torch.bfloat16) for _ in range(2)]
    before = [c.clone() for c in caches]
    prefault = kv_prefault.prefault_in_background(caches)
    if prefault is None:
        pytest.skip("no madvise here (not Linux/glibc): the cache faults in on first use")
    return caches, before, prefault


def test_prefault_keeps_contents_and_finishes():
    caches, before, prefault = _started(3, 300)
    prefault.thread.join(timeout=60)
    assert not prefault.thread.is_alive() and prefault.mapped == 300
    for c, b in zip(caches, before):
        assert torch.equal(c, b)


def test_prefault_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FREIGHT_KV_PREFAULT", "0")
    assert kv_prefault.prefault_in_background([torch.empty(2, 8, 16, 64)]) is None


def test_prefault_skips_non_cpu_tensors():
    assert kv_prefault.prefault_in_background([]) is None


def test_map_now_stops_the_thread_and_maps_what_is_asked():
    caches, before, prefault = _started(2, 600)
    prefault.map_now(450)
    assert not prefault.thread.is_alive()
    assert prefault.mapped >= 450  # (or all of it, if the thread got that far first)
    prefault.map_now(10_000)  # past the end: clamped
    assert prefault.mapped == 600
    for c, b in zip(caches, before):
        assert torch.equal(c, b)


def test_prefault_keeps_a_margin_ahead_of_the_blocks_in_use(monkeypatch):
    # one block of every head and cache is 2 * 2 * 16 * 64 * 2 = 8 KiB: a margin of 10 blocks
    monkeypatch.setattr(kv_prefault, "_AHEAD_BYTES", 80 << 10)
    caches, before, prefault = _started(2, 600)
    deadline = time.monotonic() + 60
    while prefault.mapped < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert prefault.mapped == prefault.target == 10  # and no further while nothing is used
    prefault.need(0)  # block 0 in use: the 10 mapped blocks are its margin already
    assert prefault.target == 10
    prefault.need(95)  # the engine reached block 95: map up to 95 + 1 + 10
    assert prefault.target == 106
    while prefault.mapped < 106 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert prefault.mapped == 106
    prefault.need(599)
    prefault.thread.join(timeout=60)
    assert prefault.mapped == 600 and not prefault.thread.is_alive()  # all mapped: the thread ends
    for c, b in zip(caches, before):
        assert torch.equal(c, b)


def test_engine_maps_kv_cache_before_a_timed_run():
    """LLMEngine.map_kv_cache reaches the model runner's prefault (in-process core) and generation still works."""
    from freight.config import EngineConfig
    from freight.engine.llm_engine import LLMEngine
    from freight.model_dir import default_model_path
    from freight.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=default_model_path(), max_model_len=256))
    runner = engine.engine_core.executor.worker.model_runner
    assert engine.map_kv_cache([100])
    if runner._kv_prefault is not None:
        assert runner._kv_prefault.mapped >= 7 and not runner._kv_prefault.thread.is_alive()
    engine.add_request("r", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0, max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step()
    engine.shutdown()
