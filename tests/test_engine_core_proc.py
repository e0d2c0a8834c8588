"""The server with its engine core(s) in their own processes: what happens when a core dies,
a graceful drain on SIGTERM, and data parallelism (two engine cores behind one API server)."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import psutil
import pytest

from server_utils import RemoteServer, chat_model_dir, core_pids, metric, offline, wait_for_idle  # noqa: F401

PROMPTS = ["Once upon a time", "The dog", "Lily went to the park", "A bird sang", "Tom had a red ball"]


def stream_events(srv: RemoteServer, body: dict, events: list[str]) -> None:
    try:
        with httpx.Client(timeout=60) as c, c.stream("POST", srv.url("/v1/completions"), json=body) as r:
            events.append(f"status {r.status_code}")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
    except httpx.HTTPError as e:
        events.append(f"transport error {type(e).__name__}")


def start_streams(srv: RemoteServer, n: int, max_tokens: int) -> tuple[list[list[str]], list[threading.Thread]]:
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    events: list[list[str]] = [[] for _ in range(n)]
    threads = [threading.Thread(target=stream_events, args=(srv, body, events[i])) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while any(len(e) < 4 for e in events) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert all(len(e) >= 4 for e in events), "the streams did not start"
    return events, threads


@pytest.fixture
def fresh_server(chat_model_dir, tmp_path):  # noqa: F811
    servers = []

    def start(*args: str) -> RemoteServer:
        srv = RemoteServer(chat_model_dir, list(args), tmp_path / f"server{len(servers)}.log")
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        if srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)


def test_core_death_fails_in_flight_requests_and_server_exits_nonzero(fresh_server):
    srv = fresh_server()
    (pid,) = core_pids(srv)
    events, threads = start_streams(srv, 3, 500)
    unary: list = []
    t = threading.Thread(target=lambda: unary.append(httpx.post(
        srv.url("/v1/completions"), json={"prompt": "The dog", "max_tokens": 500, "ignore_eos": True},
        timeout=60)))
    t.start()
    time.sleep(0.05)
    killed_at = time.monotonic()
    psutil.Process(pid).kill()
    health = []
    while time.monotonic() - killed_at < 5 and srv.proc.poll() is None:
        try:
            health.append(httpx.get(srv.url("/health"), timeout=1).status_code)
        except httpx.HTTPError:
            pass
        if 503 in health:
            break
        time.sleep(0.02)
    for th in [*threads, t]:
        th.join(max(5 - (time.monotonic() - killed_at), 0.1))
    assert time.monotonic() - killed_at < 5 + 1, "requests did not finish within 5 s of the core's death"
    assert not any(th.is_alive() for th in [*threads, t]), "a request hangs after the engine died"
    assert 503 in health, health
    for ev in events:
        assert ev[-1] == "[DONE]" and '"error"' in ev[-2] and "engine" in ev[-2], ev[-3:]
    (r,) = unary
    assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable", r.text
    srv.proc.wait(15)
    assert srv.proc.returncode not in (0, None), srv.log_tail()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_requests_then_exits_0(fresh_server, sig):
    srv = fresh_server()
    pids = core_pids(srv)
    events, threads = start_streams(srv, 3, 300)
    code = srv.stop(sig)
    for th in threads:
        th.join(30)
    assert code == 0, srv.log_tail()
    for ev in events:
        assert ev[-1] == "[DONE]", ev[-3:]
        assert '"finish_reason":"length"' in ev[-2].replace(" ", ""), ev[-3:]
        assert not any('"error"' in e for e in ev)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert "Traceback" not in srv.log_path.read_text()


def test_drain_timeout_aborts_what_is_left(fresh_server):
    srv = fresh_server("--graceful-shutdown-timeout", "0")
    events, threads = start_streams(srv, 2, 500)
    code = srv.stop(signal.SIGTERM)
    for th in threads:
        th.join(30)
    assert code == 0, srv.log_tail()
    for ev in events:
        assert ev[-1] == "[DONE]" and '"error"' in ev[-2] and "shutting down" in ev[-2], ev[-3:]


def test_data_parallel_two_engines(fresh_server, offline):  # noqa: F811
    srv = fresh_server("--data-parallel-size", "2")
    assert len(core_pids(srv)) == 2
    from freight import SamplingParams

    want = [o.outputs[0].text for o in offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24),
                                                        use_tqdm=False)]
    results: list = [None] * len(PROMPTS) * 2

    def send(i: int) -> None:
        r = httpx.post(srv.url("/v1/completions"), timeout=60,
                       json={"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 24, "temperature": 0})
        results[i] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == want * 2
    m = wait_for_idle(srv)
    steps = {e: metric(m, "freight:engine_steps_total", engine=e) for e in ("0", "1")}
    assert all(v > 0 for v in steps.values()), f"both engines should have served requests: {steps}"
    assert metric(m, "freight:kv_cache_total_blocks") == 2 * metric(m, "freight:kv_cache_total_blocks", engine="0")
    assert metric(m, "vllm:generation_tokens_total") == 24 * len(results)
    assert metric(m, "vllm:request_success_total", finished_reason="length") == len(results)
    assert srv.stop(signal.SIGTERM) == 0


# -- the two-process path against transformers, every architecture ------------------------------

ARCHS = ["llama_gqa", "mistral_swa", "qwen2_bias", "qwen3_qknorm"]


@pytest.mark.parametrize("dp", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_core_processes_match_hf(random_model, arch, dp):
    """Greedy tokens through AsyncLLM with the engine core(s) in their own processes equal transformers'
    (the HTTP layer on top is architecture-independent and checked against the offline engine)."""
    import asyncio

    from freight import SamplingParams
    from freight.config import EngineConfig
    from freight.engine.async_llm import AsyncLLM
    from test_parity_hf import check_outputs, random_ids, vocab_of

    model_dir = random_model(arch)
    prompts = [random_ids(n, vocab_of(model_dir), seed=n) for n in (5, 17, 33, 40)]
    llm = AsyncLLM(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", kv_cache_memory="32MiB",
                                num_threads=1, max_num_batched_tokens=32),
                   data_parallel_size=dp, log_stats_interval=0, log_requests=False)
    try:
        async def run():
            async def one(i, p):
                outs = [o async for o in llm.generate({"prompt_token_ids": p},
                                                      SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                                      f"r{i}")]
                return outs[-1]
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

        outs = asyncio.run(run())
        check_outputs(model_dir, prompts, outs, 12, f"{arch} dp={dp}")
        if dp == 2:
            assert all(s.num_steps > 0 for s in llm.get_engine_stats()), "both engine cores should have run"
    finally:
        llm.shutdown()


def test_offline_data_parallel_matches_single_engine(random_model, make_llm):
    from test_parity_hf import check_outputs, generate, greedy, random_ids, vocab_of

    model_dir = random_model("llama_gqa")
    prompts = [random_ids(n, vocab_of(model_dir), seed=100 + n) for n in (3, 9, 21, 30, 8, 14)]
    llm = make_llm(model_dir, data_parallel_size=2)
    outs = generate(llm, [{"prompt_token_ids": p} for p in prompts], greedy(10))
    check_outputs(model_dir, prompts, outs, 10, "offline dp=2")
    assert llm.llm_engine.get_stats().num_free_blocks == llm.llm_engine.get_stats().num_total_blocks
