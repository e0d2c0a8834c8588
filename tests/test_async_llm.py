"""AsyncLLM with its engine core on a thread of this process (the same busy loop the server
runs in its own process): streaming deltas, validation before queueing, a failing step that
fails only the requests in flight, the waiting-queue limit, aborts on cancellation, and
shutdown. (The HTTP server and the engine-core process are covered by test_server*.py and
test_engine_core_proc.py.)"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from freight import SamplingParams
from freight.config import EngineConfig
from freight.engine.async_llm import (AsyncLLM, EngineOverloadedError, EngineShutdownError, EngineStepError)
from freight.engine.llm_engine import PromptError


@pytest.fixture(scope="module")
def async_llm(stories_dir):
    llm = AsyncLLM(EngineConfig(model=str(stories_dir), dtype="float32", device="cpu", kv_cache_memory="16MiB",
                                num_threads=1, max_num_seqs=8), multiprocess=False, log_stats_interval=0)
    yield llm
    llm.shutdown()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n)


async def collect(llm: AsyncLLM, rid: str, prompt="Once upon a time", n: int = 8):
    return [out async for out in llm.generate(prompt, greedy(n), rid)]


def wait_idle(llm: AsyncLLM, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = llm.get_stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks:
            return s
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {llm.get_stats()}")


def test_generate_streams_deltas(async_llm):
    outs = asyncio.run(collect(async_llm, "a1", n=10))
    final = outs[-1]
    assert final.finished and not any(o.finished for o in outs[:-1])
    assert "".join(o.delta_text[0] for o in outs) == final.outputs[0].text
    assert sum(len(o.delta_token_ids[0]) for o in outs) == len(final.outputs[0].token_ids) == 10


def test_concurrent_requests_match_sequential(async_llm):
    prompts = ["Once upon a time", "The dog", "Lily went", "A bird"]

    async def run():
        return await asyncio.gather(*(collect(async_llm, f"c{i}", p, 12) for i, p in enumerate(prompts)))

    together = [o[-1].outputs[0].text for o in asyncio.run(run())]
    alone = [asyncio.run(collect(async_llm, f"s{i}", p, 12))[-1].outputs[0].text for i, p in enumerate(prompts)]
    assert together == alone


def test_invalid_requests_raise_before_queueing(async_llm):
    async def add(prompt, params=None, rid="bad"):
        return async_llm.add_request(rid, prompt, params or greedy(4))

    with pytest.raises(PromptError):
        asyncio.run(add([]))
    with pytest.raises(PromptError):
        asyncio.run(add([5] * 600))
    with pytest.raises(PromptError):
        asyncio.run(add([1, 10**6]))
    with pytest.raises(ValueError, match="max_num_seqs"):
        asyncio.run(add("Hi", SamplingParams(n=9)))
    assert async_llm.is_healthy
    assert asyncio.run(collect(async_llm, "after-bad"))[-1].finished


def test_failed_step_fails_in_flight_requests_and_loop_survives(async_llm, monkeypatch):
    engine = async_llm.client.engine_core
    real_step = engine.step
    failed = []
    start = engine.make_stats().num_generated_tokens

    def flaky_step():
        # Fail once both requests are in the engine and have made some progress.
        if (not failed and engine.scheduler.num_unfinished == 2
                and engine.make_stats().num_generated_tokens > start):
            failed.append(True)
            raise RuntimeError("injected failure")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)

    async def run():
        return await asyncio.gather(collect(async_llm, "f1", n=20), collect(async_llm, "f2", "The dog", 20),
                                    return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, EngineStepError) for r in results), results
    assert "injected failure" in str(results[0])
    wait_idle(async_llm)
    assert async_llm.is_healthy
    assert asyncio.run(collect(async_llm, "f3"))[-1].outputs[0].finish_reason == "length"


def test_waiting_limit(async_llm, monkeypatch):
    engine = async_llm.client.engine_core
    real_step = engine.step
    gate, entered = threading.Event(), threading.Event()

    def gated_step():
        entered.set()
        gate.wait(10)
        return real_step()

    monkeypatch.setattr(engine, "step", gated_step)
    monkeypatch.setattr(async_llm, "max_waiting", 2)

    async def run():
        a = async_llm.add_request("w1", "Once", greedy(3))
        await asyncio.to_thread(entered.wait, 10)  # A is in the engine, whose thread now blocks in step()
        b = async_llm.add_request("w2", "Once", greedy(3))
        with pytest.raises(EngineOverloadedError):
            async_llm.add_request("w3", "Once", greedy(3))
        gate.set()
        return [out async for out in a][-1], [out async for out in b][-1]

    a, b = asyncio.run(run())
    assert a.finished and b.finished
    wait_idle(async_llm)


def test_cancelled_consumer_aborts_request(async_llm):
    async def run():
        seen = []

        async def consume():
            async for out in async_llm.generate("Once upon a time", greedy(400), "x1"):
                seen.append(out)

        task = asyncio.create_task(consume())
        while len(seen) < 2:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    assert len(asyncio.run(run())) >= 2
    stats = wait_idle(async_llm)
    assert stats.kv_cache_usage == 0


def test_shutdown_aborts_in_flight(async_llm):
    async def run():
        stream = async_llm.add_request("z1", "Once upon a time", greedy(400))
        await stream.get()
        async_llm.begin_shutdown()
        with pytest.raises(EngineShutdownError):
            async for _ in stream:
                pass
        with pytest.raises(EngineShutdownError):
            async_llm.add_request("z2", "Once", greedy(3))

    asyncio.run(run())
    async_llm.shutdown()
    assert not async_llm._thread.is_alive() and not async_llm.client._thread.is_alive()
    s = async_llm.client.engine_core.make_stats()
    assert s.num_running == 0 and s.num_free_blocks == s.num_total_blocks
