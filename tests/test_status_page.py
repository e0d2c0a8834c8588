"""The live status page: the engine core's snapshots, the /status endpoints, and the page in Chromium.

- The core builds a snapshot only while its lease is renewed and at most every MIN_INTERVAL_S;
  its block map agrees block by block with the pool's ref counts (shared blocks of n = 2 too).
- Against a server with two engine cores (-dp 2) under load: every core's section, queue entries,
  block counts that add up, blocks held that match the requests' tables, nothing held afterwards;
  the SSE stream; the API key on the data endpoints.
- The page itself in headless Chromium (scripts/ensure_chromium.sh installs it if it can; the
  test skips only when it cannot), driven over the DevTools protocol on a pipe: it must draw the
  block map and both queues from the live stream.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import select
import signal
import subprocess
import tempfile
import threading
import time
from typing import Optional

import httpx
import numpy as np
import pytest

from server_utils import API_KEY, REPO_ROOT, RemoteServer

SERVED_NAME = "stories"
# Small on purpose: ~100 blocks a core and 3 sequences each, so that a few requests fill the
# block map and leave some waiting (and preempted).
SERVER_FLAGS = ["-dp", "2", "--kv-cache-memory", "2MiB", "--max-num-seqs", "3", "--served-model-name", SERVED_NAME]
# Distinct first tokens: the requests share no blocks.
SUBJECTS = ["Lily", "Tom", "A bird", "The dog", "Sue", "Ben", "The cat", "Max", "Anna", "The sun"]


# -- the engine core's side ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_core(stories_dir):
    from freight.config import EngineConfig
    from freight.engine.core import EngineCore

    core = EngineCore(EngineConfig(model=str(stories_dir), dtype="float32", device="cpu", kv_cache_memory="1MiB"))
    yield core
    core.shutdown()


def _add(core, request_id: str, prompt: list[int], max_tokens: int, n: int = 1) -> None:
    from freight.engine.messages import EngineCoreRequest
    from freight.sampling_params import SamplingParams

    core.add_request(EngineCoreRequest(
        request_id=request_id, prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=max_tokens, n=n),
        eos_token_ids=[], max_tokens=max_tokens, arrival_time=time.monotonic(),
        fork_ids=[f"{request_id}#{i}" for i in range(1, n)]))


def test_core_sends_snapshots_only_while_watched(engine_core):
    from freight.core import status

    clock = [1000.0]
    engine_core.status_lease = status.StatusLease(clock=lambda: clock[0])
    _add(engine_core, "unwatched", list(range(1, 40)), max_tokens=6)
    assert all(engine_core.step().status is None for _ in range(3)), "nobody watches: no snapshots"
    engine_core.want_status()
    assert engine_core.step().status is not None
    assert engine_core.step().status is None, "a second snapshot within MIN_INTERVAL_S"
    clock[0] += status.MIN_INTERVAL_S
    assert engine_core.step().status is not None
    clock[0] += status.LEASE_S + 0.01
    assert engine_core.step().status is None, "the lease has run out"
    engine_core.abort_all()


def test_block_map_matches_the_pool(engine_core):
    from freight.core.status import BlockState, block_counts

    _add(engine_core, "pair", list(range(1, 50)), max_tokens=20, n=2)   # two sequences sharing the prompt's blocks
    _add(engine_core, "single", list(range(60, 100)), max_tokens=20)
    for _ in range(4):
        engine_core.step()
    snap = engine_core.make_status()
    pool = engine_core.kv_cache.pool
    states, holders = snap.states(), snap.holders()
    requests = snap.running + snap.waiting
    assert {r.request_id for r in snap.running} == {"pair", "pair#1", "single"}
    for block in pool.blocks:
        state = BlockState(states[block.block_id])
        if block.ref_cnt == 0:
            assert state == (BlockState.CACHED if block.block_hash is not None else BlockState.FREE)
            assert holders[block.block_id] == -1
        else:
            assert state == (BlockState.SHARED if block.ref_cnt > 1 else BlockState.HELD)
            holder = requests[holders[block.block_id]].request_id
            assert block.block_id in engine_core.kv_cache.block_ids(holder)
    assert snap.shared_block_refs == {b.block_id: b.ref_cnt for b in pool.blocks if b.ref_cnt > 1}
    assert snap.shared_block_refs, "the n = 2 siblings share their prompt's blocks"
    counts = block_counts(snap)
    assert sum(counts.values()) == pool.num_blocks and counts["free"] + counts["cached"] == pool.num_free_blocks
    for r in requests:
        assert r.num_blocks == len(engine_core.kv_cache.block_ids(r.request_id))
    assert snap.recent_steps and all(s.duration_s > 0 for s in snap.recent_steps)
    engine_core.abort_all()


def test_feed_with_the_core_on_a_thread(stories_dir):
    """AsyncLLM with multiprocess=False (the core's busy loop on a thread): snapshots, TTFT and TPOT."""
    import asyncio

    from freight import SamplingParams
    from freight.config import EngineConfig
    from freight.engine.async_llm import AsyncLLM
    from freight.engine.status_feed import StatusFeed

    llm = AsyncLLM(EngineConfig(model=str(stories_dir), dtype="float32", device="cpu", kv_cache_memory="1MiB",
                                num_threads=1), multiprocess=False, log_stats_interval=0, log_requests=False)
    try:
        feed = StatusFeed(llm)
        llm.output_observers.append(feed.observe)
        seen: list[dict] = []

        async def watch_while_generating() -> None:
            async def generate(i: int) -> None:
                async for _ in llm.generate(f"{SUBJECTS[i]} went to the park",
                                            SamplingParams(temperature=0, max_tokens=150, ignore_eos=True), f"r{i}"):
                    feed.keep_watching()
                    seen.append(feed.snapshot())
                    await asyncio.sleep(0)

            await asyncio.gather(*(generate(i) for i in range(3)))

        asyncio.run(watch_while_generating())
        busy = [s["engines"][0] for s in seen if not s["engines"][0]["pending"] and s["engines"][0]["num_running"]]
        assert busy, "snapshots arrived while the requests ran"
        for eng in busy:
            check_engine_section(eng)
        assert {r["request_id"] for eng in busy for r in eng["requests"]} == {"r0", "r1", "r2"}
        final = feed.snapshot()
        assert final["ttft_s"]["count"] == 3 and final["tpot_s"]["count"] == 3
    finally:
        llm.shutdown()


# -- the server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def status_server(stories_dir, tmp_path_factory):
    srv = RemoteServer(stories_dir, SERVER_FLAGS, tmp_path_factory.mktemp("status_server") / "server.log",
                       api_key=API_KEY)
    yield srv
    # An open status stream must not hold up the shutdown: the server ends it, and exits cleanly.
    ended: list[str] = []
    first_event = threading.Event()

    def watch() -> None:
        try:
            with httpx.stream("GET", srv.url("/status/events"), headers=srv.headers(), timeout=120) as r:
                for line in r.iter_lines():
                    first_event.set()
            ended.append("closed by the server")
        except httpx.HTTPError as e:
            ended.append(f"transport error {type(e).__name__}")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert first_event.wait(60), "no status event"
    code = srv.stop(signal.SIGTERM)
    watcher.join(10)
    assert code == 0, f"server exit code {code} after SIGTERM:\n{srv.log_tail()}"
    assert ended == ["closed by the server"]
    assert "Traceback" not in srv.log_path.read_text(errors="replace"), srv.log_tail()


@contextlib.contextmanager
def load(srv: RemoteServer, num_clients: int = len(SUBJECTS), max_tokens: int = 200):
    """Clients that each send completions one after another until the block ends."""
    stop = threading.Event()
    errors: list[str] = []

    def client(subject: str) -> None:
        body = {"model": SERVED_NAME, "prompt": f"{subject} went to the park", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        with httpx.Client(timeout=120, headers=srv.headers()) as c:
            while not stop.is_set():
                r = c.post(srv.url("/v1/completions"), json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in SUBJECTS[:num_clients]]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    assert not errors, errors


def get_snapshot(srv: RemoteServer) -> dict:
    r = httpx.get(srv.url("/status/snapshot"), headers=srv.headers(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(srv: RemoteServer, ready, what: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        snap = get_snapshot(srv)
        if ready(snap):
            return snap
        assert time.monotonic() < deadline, f"no snapshot with {what} after {timeout}s: {json.dumps(snap)[:2000]}"
        time.sleep(0.1)


def check_engine_section(eng: dict) -> None:
    """What holds for any snapshot of one engine core."""
    states = np.frombuffer(eng["block_states"].encode("ascii"), dtype=np.uint8) - ord("0")
    holders = np.array(eng["block_holders"])
    counts = eng["block_counts"]
    assert len(states) == len(holders) == eng["num_blocks"]
    assert [int((states == s).sum()) for s in range(4)] == [counts[k] for k in ("free", "cached", "held", "shared")]
    assert sum(counts.values()) == eng["num_blocks"], "free + cached + held + shared is every block"
    held = counts["held"] + counts["shared"]
    assert held == round(eng["kv_cache_usage"] * eng["num_blocks"]), "the map agrees with the KV usage"
    running = [r for r in eng["requests"] if r["queue"] == "running"]
    waiting = [r for r in eng["requests"] if r["queue"] == "waiting"]
    assert (len(running), len(waiting)) == (eng["num_running"], eng["num_waiting"])
    assert all(r["status"] == "running" for r in running)
    assert all(r["status"] in ("waiting", "preempted") and r["num_blocks"] == 0 for r in waiting)
    # Every reference to a block is one entry of a running request's table.
    refs = counts["held"] + sum(n - 1 for n in eng["shared_block_refs"].values())
    assert refs == sum(r["num_blocks"] for r in running)
    if counts["shared"] == 0:
        for i, r in enumerate(eng["requests"]):
            assert int((holders == i).sum()) == r["num_blocks"], r
    for r in running:
        assert r["num_computed_tokens"] <= r["num_prompt_tokens"] + r["num_output_tokens"]
        assert r["num_blocks"] * eng["block_size"] >= r["num_computed_tokens"]


def test_snapshot_under_load_and_after(status_server):
    with load(status_server):
        snap = wait_for(status_server, lambda s: all(not e["pending"] and e["num_running"] for e in s["engines"])
                        and any(e["num_waiting"] for e in s["engines"]),
                        "requests running in both engine cores, and some waiting")
        assert len(snap["engines"]) == 2 and [e["engine_index"] for e in snap["engines"]] == [0, 1]
        for eng in snap["engines"]:
            check_engine_section(eng)
            assert eng["block_counts"]["held"] > 0
            assert eng["recent_steps"] and eng["mean_step_time_s"] > 0 and eng["mean_batch_tokens"] > 0
        snap = wait_for(status_server, lambda s: s["ttft_s"]["count"] and s["tpot_s"]["count"]
                        and (s["generation_tokens_per_s"] or 0) > 0, "TTFT, TPOT and tokens/s")
        for key in ("ttft_s", "tpot_s"):
            w = snap[key]
            assert 0 < w["p50"] <= w["p90"] <= w["p99"], w
    idle = wait_for(status_server, lambda s: all(e["num_running"] == e["num_waiting"] == 0
                                                 and e["block_counts"]["held"] == 0 for e in s["engines"]),
                    "every request finished")
    for eng in idle["engines"]:
        check_engine_section(eng)
        assert eng["requests"] == [] and eng["block_counts"]["shared"] == 0
        assert eng["block_counts"]["cached"] > 0, "finished requests leave their full blocks prefix-cached"
        assert set(eng["block_holders"]) == {-1}


def test_events_stream(status_server):
    events, started = [], time.monotonic()
    with httpx.stream("GET", status_server.url("/status/events"), headers=status_server.headers(),
                      timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append((time.monotonic(), json.loads(line[6:])))
            if len(events) == 4:
                break
    times = [t for t, _ in events]
    assert times[0] - started < 10
    # a few a second at most (the server spaces them at least MIN_INTERVAL_S apart)
    assert times[-1] - times[0] >= 3 * 0.25 - 0.05
    for _, snap in events:
        assert [e["engine_index"] for e in snap["engines"]] == [0, 1]
        for eng in snap["engines"]:
            assert not eng["pending"]
            check_engine_section(eng)


def test_data_endpoints_need_the_api_key_and_the_page_does_not(status_server):
    for path in ("/status/snapshot", "/status/events"):
        assert httpx.get(status_server.url(path), timeout=30).status_code == 401
        wrong = {"Authorization": "Bearer not-the-key"}
        assert httpx.get(status_server.url(path), headers=wrong, timeout=30).status_code == 401
    for path in ("/", "/status"):
        r = httpx.get(status_server.url(path), timeout=30)  # static HTML, no data in it
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "status/events" in r.text
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", r.text), "nothing loaded from elsewhere"
    assert httpx.get(status_server.url("/status/other"), timeout=30).status_code == 401  # no prefix opens up


# -- the page in a browser ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def chromium() -> str:
    script = REPO_ROOT / "scripts" / "ensure_chromium.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.skip(f"Chromium is not installed and could not be installed: {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]


class HeadlessChromium:
    """Chromium driven over the DevTools protocol on a pipe (fds 3 and 4: NUL-terminated JSON)."""

    def __init__(self, binary: str, width: int = 1200, height: int = 900):
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()

        def wire_pipes() -> None:  # in the child: the protocol wants them exactly as fds 3 and 4
            fds = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
            os.dup2(fds[0], 3)
            os.dup2(fds[1], 4)

        self._profile = tempfile.TemporaryDirectory(prefix="freight-chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--window-size={width},{height}", f"--user-data-dir={self._profile.name}", "about:blank"],
            preexec_fn=wire_pipes, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id = b"", 0
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self._session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method: str, session: Optional[str] = None, timeout: float = 60, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"no answer to {method} within {timeout}s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium exited")
            self._buffer += chunk

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", self._session, url=url)

    def evaluate(self, expression: str):
        reply = self.call("Runtime.evaluate", self._session, expression=expression, returnByValue=True)
        return reply["result"].get("value")

    def wait_until(self, expression: str, what: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"the page did not show {what} within {timeout}s:\n"
                                     + str(self.evaluate("document.body.innerText"))[:2000])
            time.sleep(0.2)
        return value

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", self._session, format="png")["data"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=10)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._profile.cleanup()


def test_page_in_chromium_draws_block_map_and_queues(status_server, chromium, tmp_path):
    browser = HeadlessChromium(chromium)
    try:
        browser.navigate(status_server.url("/status"))  # no key yet: the page asks for one
        browser.wait_until("document.getElementById('conn').textContent === 'API key needed'", "the key prompt")
        with load(status_server):
            browser.navigate(status_server.url(f"/status#api_key={API_KEY}"))
            sections = "[...document.querySelectorAll('section.engine')]"
            browser.wait_until(f"""Number(document.body.dataset.snapshots || 0) >= 3 && {sections}.length == 2 &&
                {sections}.every(s => !!s.querySelector('tr.req[data-queue=running]')) &&
                {sections}.some(s => !!s.querySelector('tr.req[data-queue=waiting]'))""",
                               "running requests in both engine sections and waiting ones", timeout=180)
            shown = browser.evaluate("""[...document.querySelectorAll('section.engine')].map(s => ({
                engine: s.dataset.engine, map: Object.assign({}, s.querySelector('canvas.blockmap').dataset),
                running: [...s.querySelectorAll('tr.req[data-queue=running]')].map(r => r.dataset.requestId),
                waiting: s.querySelectorAll('tr.req[data-queue=waiting]').length}))""")
            png = browser.screenshot()
        assert browser.evaluate("location.hash") == "", "the key leaves the address bar"
    finally:
        browser.close()
    assert [s["engine"] for s in shown] == ["0", "1"]
    for section in shown:
        m = {k: int(v) for k, v in section["map"].items()}
        assert m["blocks"] > 0 and m["free"] + m["cached"] + m["held"] + m["shared"] == m["blocks"], m
        assert m["held"] > 0, "blocks held by the running requests are drawn"
        assert section["running"] and all(rid.startswith("cmpl-") for rid in section["running"])
    assert any(section["waiting"] for section in shown)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    (tmp_path / "status-page.png").write_bytes(png)
