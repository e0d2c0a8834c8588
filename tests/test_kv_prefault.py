"""The KV-cache prefault thread maps pages without changing what the engine wrote."""

import pytest
import torch

from freight.worker import kv_prefault


def test_prefault_keeps_contents_and_finishes():
    caches = [torch.randn(3, 300, 16, 64).to(torch.bfloat16) for _ in range(2)]
    before = [c.clone() for c in caches]
    thread = kv_prefault.prefault_in_background(caches)
    if thread is None:
        pytest.skip("no madvise here (not Linux/glibc): the cache faults in on first use")
    thread.join(timeout=60)
    assert not thread.is_alive()
    for c, b in zip(caches, before):
        assert torch.equal(c, b)


def test_prefault_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FREIGHT_KV_PREFAULT", "0")
    assert kv_prefault.prefault_in_background([torch.empty(2, 8, 16, 64)]) is None


def test_prefault_skips_non_cpu_tensors():
    assert kv_prefault.prefault_in_background([]) is None
