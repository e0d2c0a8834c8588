"""Shared-memory collectives (freight.distributed.shm_comm) between spawned processes.

One spawn per world size runs every all-reduce/all-gather check (spawning costs a torch
import per process); each rank checks its results against the rank-order sum computed
from every rank's seeded inputs, so all ranks being right means all are bit-identical.
A rank that fails aborts the segment so its peers fail fast instead of waiting; the
parent joins with timeouts and kills leftovers, so nothing here can hang.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import time
import traceback
import uuid

import pytest
import torch

from freight.distributed.shm_comm import ShmCommunicator

pytestmark = pytest.mark.skipif(not ShmCommunicator.available(),
                                reason="shm_comm C kernel unavailable (no C compiler, FREIGHT_DISABLE_C_KERNELS=1 "
                                       "or no /dev/shm)")

SMALL_SLOT = 1024  # bytes per rank and parity: 256 fp32 / 512 bf16 elements per chunk
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _name() -> str:
    return f"freight-test-{uuid.uuid4().hex[:16]}"


def _inputs(world: int, shape, dtype, seed: int) -> list:
    return [torch.randn(shape, generator=torch.Generator().manual_seed(seed * 101 + r)).to(dtype)
            for r in range(world)]


def _expected_sum(xs: list) -> torch.Tensor:
    acc = xs[0].float()
    for x in xs[1:]:
        acc = acc + x.float()  # rank order, fp32 accumulation, one rounding at the end
    return acc.to(xs[0].dtype)


def _run_ranks(fn, world: int, *args, timeout: float = 60.0) -> list:
    """Run fn(rank, world, comms, *args) in `world` spawned processes; the list of their results."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, *args, q), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, ok, value = q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_mod.Empty:
                pytest.fail(f"ranks {sorted(set(range(world)) - set(results))} did not report within {timeout} s")
            assert ok, f"rank {rank} failed:\n{value}"
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]


def _entry(fn, rank, world, *args):
    """Worker: report (rank, ok, fn's value or traceback); on failure abort fn's communicators so peers
    stop waiting."""
    *args, q = args
    comms = []
    try:
        value = fn(rank, world, comms, *args)
        q.put((rank, True, value))
    except BaseException:
        for c in comms:
            c.abort()
        q.put((rank, False, traceback.format_exc()))
    finally:
        for c in comms:
            c.close()


def _collectives(rank, world, comms, name_default, name_small):
    torch.set_num_threads(1)
    if rank == 0:
        time.sleep(0.3)  # the others start waiting for a segment that does not exist yet
    default = ShmCommunicator(name_default, rank, world)
    comms.append(default)
    small = ShmCommunicator(name_small, rank, world, slot_bytes=SMALL_SLOT)
    comms.append(small)
    checksum = 0.0
    seed = 0
    # all_reduce: 1 element to several chunks, odd sizes, all dtypes, 1-d and 2-d.
    for comm, shapes in ((small, [1, 7, 255, 256, 257, 511, 513, 1000, (5, 131), 4099]),
                         (default, [(64, 576), 3 * (default.slot_bytes // 4) + 17])):
        for dtype in DTYPES:
            for shape in shapes:
                seed += 1
                xs = _inputs(world, shape, dtype, seed)
                x = xs[rank].clone()
                assert comm.all_reduce(x) is x
                want = _expected_sum(xs)
                assert torch.equal(x, want), f"all_reduce {dtype} {shape} differs from the rank-order sum"
                checksum += float(x.float().sum())
    # Many consecutive small calls: the double-buffered slots are reused without a barrier.
    for i in range(500):
        n = 1 + (i * 37) % 300  # crosses the 256-element chunk now and then
        xs = [torch.full((n,), float(r + 1)) + torch.arange(n) * (i + 1) for r in range(world)]
        x = xs[rank].clone()
        small.all_reduce(x)
        assert torch.equal(x, _expected_sum(xs)), f"call {i}"
    # A non-contiguous tensor is reduced in place too.
    xs = _inputs(world, (8, 6), torch.float32, 999)
    x = xs[rank].clone().t()
    small.all_reduce(x)
    assert torch.equal(x, _expected_sum(xs).t())
    # all_gather along the last and the first dimension, chunked and not.
    for comm in (small, default):
        for dtype in DTYPES:
            for shape, dim in (((3, 5), -1), ((3, 5), 0), ((4, 300), -1), ((300, 4), 0), ((2, 3, 97), 1),
                               ((700,), 0)):
                seed += 1
                xs = _inputs(world, shape, dtype, seed)
                got = comm.all_gather(xs[rank], dim)
                assert torch.equal(got, torch.cat(xs, dim)), f"all_gather {dtype} {shape} dim={dim}"
    return checksum


@pytest.mark.parametrize("world", [2, 3])
def test_collectives(world):
    names = [_name(), _name()]
    try:
        checksums = _run_ranks(_collectives, world, *names, timeout=120)
    finally:
        for n in names:
            assert not os.path.exists(f"/dev/shm/{n}"), "rank 0's close() left the segment behind"
    assert len(set(checksums)) == 1


def _waits_for_absent_peer(rank, world, comms, name, waiting):
    comm = ShmCommunicator(name, rank, world)
    comms.append(comm)
    waiting.set()
    start = time.monotonic()
    try:
        comm.all_reduce(torch.ones(10))
    except RuntimeError as e:
        assert "aborted" in str(e), str(e)
    else:
        raise AssertionError("all_reduce returned without its peer")
    waited = time.monotonic() - start
    try:  # an aborted segment stays aborted: later collectives fail at once
        comm.all_gather(torch.ones(3))
    except RuntimeError as e:
        assert "aborted" in str(e), str(e)
    else:
        raise AssertionError("all_gather on an aborted segment returned")
    return waited


def test_abort_wakes_a_waiting_rank():
    """Rank 1 (a child) waits in all_reduce for rank 0 (this process), which never joins the
    collective and aborts instead; the child must raise, not hang."""
    name = _name()
    owner = ShmCommunicator(name, 0, 2)
    try:
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        waiting = ctx.Event()
        p = ctx.Process(target=_entry, args=(_waits_for_absent_peer, 1, 2, name, waiting, q), daemon=True)
        p.start()
        assert waiting.wait(timeout=60), "the child never got to its all_reduce"
        time.sleep(0.5)  # well into its wait (spinning, then yielding)
        owner.abort()
        try:
            rank, ok, value = q.get(timeout=60)
        finally:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        assert ok, value
        assert value >= 0.3, f"all_reduce returned after {value:.3f} s: before the abort"
    finally:
        owner.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def _mismatch(rank, world, comms, name):
    comm = ShmCommunicator(name, rank, world, timeout_s=30)
    comms.append(comm)
    try:
        comm.all_reduce(torch.ones(10 + rank))
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_mismatched_collectives_fail_on_every_rank():
    errors = _run_ranks(_mismatch, 2, _name())
    assert all("mismatch" in e or "aborted" in e for e in errors), errors
    assert any("mismatch" in e for e in errors), errors


def test_timeout_and_close():
    name = _name()
    comm = ShmCommunicator(name, 0, 2, timeout_s=0.2)
    assert os.path.exists(f"/dev/shm/{name}")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out waiting for rank 1"):
        comm.all_reduce(torch.ones(4))
    assert time.monotonic() - start < 10
    with pytest.raises(RuntimeError, match="aborted"):  # the timeout aborted the segment for everyone
        comm.all_reduce(torch.ones(4))
    comm.close()
    assert not os.path.exists(f"/dev/shm/{name}")
    comm.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        comm.all_gather(torch.ones(4))


def test_single_rank_and_errors():
    with ShmCommunicator(_name(), 0, 1, slot_bytes=256) as comm:
        x = torch.randn(1000)
        assert torch.equal(comm.all_reduce(x.clone()), x)
        assert torch.equal(comm.all_gather(x.view(10, 100), 0), x.view(10, 100))
        assert comm.all_reduce(torch.empty(0)).numel() == 0
        with pytest.raises(TypeError):
            comm.all_reduce(torch.ones(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="not ready"):
        ShmCommunicator(_name(), 1, 2, connect_timeout_s=0.2)  # rank 0 never creates it
    with pytest.raises(ValueError):
        ShmCommunicator("a/b", 0, 2)
