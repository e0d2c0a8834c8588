"""Helpers for tests that run `freight serve` as a real subprocess on 127.0.0.1.

- `RemoteServer`: starts the server on a free port (output to a log file, so a full
  pipe can never block it), waits for /health, stops it with a signal and returns
  the exit code; a failed start shows the log's tail.
- `chat_model_dir`: stories260k plus a small ChatML-like chat template.
- `server` / `offline`: one shared server (API key on) and the offline LLM for the
  same model, both session-scoped (import them into a test module to use them).
- `scrape`: /metrics parsed with prometheus_client's own text parser.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Union

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-freight-test"
SERVED_NAME = "stories-chat"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Small, test-friendly engine settings (float32 so greedy output matches the offline engine).
ENGINE_FLAGS = ["--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB", "--num-threads", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    # What the health poll verifies TLS against (a TLS server's subclass sets its own context).
    verify: Union[bool, "ssl.SSLContext"] = True

    def __init__(self, model: Path, extra_args: list[str], log_path: Path, api_key: Optional[str] = None,
                 startup_timeout: float = 180.0):
        self.port = free_port()
        self.api_key = api_key
        self.log_path = log_path
        args = [sys.executable, "-m", "freight", "serve", str(model), "--host", "127.0.0.1",
                "--port", str(self.port), *ENGINE_FLAGS, *extra_args]
        if api_key:
            args += ["--api-key", api_key]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1")
        env.pop("FREIGHT_API_KEY", None)
        env.pop("VLLM_API_KEY", None)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready(startup_timeout)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                if httpx.get(self.url("/health"), verify=self.verify, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log_tail()}")

    def client(self, **kw):
        import openai

        kw = dict(dict(base_url=self.url("/v1"), api_key=self.api_key or "unused", max_retries=0, timeout=120), **kw)
        return openai.OpenAI(**kw)

    def async_client(self, **kw):
        import openai

        kw = dict(dict(base_url=self.url("/v1"), api_key=self.api_key or "unused", max_retries=0, timeout=120), **kw)
        return openai.AsyncOpenAI(**kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the server and return its exit code (killing it if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server did not exit within {timeout}s of signal {sig}:\n{self.log_tail()}")
        self._log.close()
        return self.proc.returncode


def core_pids(srv: RemoteServer) -> list[int]:
    """The server's engine-core processes: its spawned children (not multiprocessing's resource tracker)."""
    import psutil

    cmdlines = [(p.pid, " ".join(p.cmdline())) for p in psutil.Process(srv.proc.pid).children()]
    return [pid for pid, cmd in cmdlines if "spawn_main" in cmd and "resource_tracker" not in cmd]


@contextlib.contextmanager
def clean_server(model: Path, extra_args: list[str], log_path: Path, api_key: Optional[str] = None):
    """A RemoteServer that must stop cleanly: SIGTERM at the end gives exit 0 and no traceback in its log."""
    srv = RemoteServer(model, extra_args, log_path, api_key=api_key)
    yield srv
    code = srv.stop(signal.SIGTERM)
    assert code == 0, f"server exit code {code} after SIGTERM:\n{srv.log_tail()}"
    assert "Traceback" not in log_path.read_text(errors="replace"), srv.log_tail()


def scrape(server: RemoteServer) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} from /metrics, via prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(server.url("/metrics"), timeout=30)
    r.raise_for_status()
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


def wait_for_idle(server: RemoteServer, timeout: float = 30.0) -> dict:
    """Poll /metrics until nothing runs or waits and every KV block is free; returns the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(server)
        idle = (metric(m, "vllm:num_requests_running") == 0 and metric(m, "vllm:num_requests_waiting") == 0
                and metric(m, "freight:kv_cache_free_blocks") == metric(m, "freight:kv_cache_total_blocks")
                and metric(m, "vllm:kv_cache_usage_perc") == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def make_chat_model_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=1))
    return dst


@pytest.fixture(scope="session")
def chat_model_dir(stories_dir, tmp_path_factory) -> Path:
    return make_chat_model_dir(stories_dir, tmp_path_factory.mktemp("chat_model") / "stories-chat")


@pytest.fixture(scope="session")
def server(chat_model_dir, tmp_path_factory):
    """The shared server: stories260k with a chat template, an API key, and a served name."""
    log = tmp_path_factory.mktemp("server_logs") / "server.log"
    srv = RemoteServer(chat_model_dir, ["--served-model-name", SERVED_NAME, "--log-stats-interval", "2"], log,
                       api_key=API_KEY)
    yield srv
    code = srv.stop(signal.SIGTERM)
    assert code == 0, f"server exit code {code} after SIGTERM:\n{srv.log_tail()}"


@pytest.fixture(scope="session")
def offline(chat_model_dir):
    """The offline LLM on the same model and settings as `server`, for reference outputs."""
    import torch

    from freight import LLM

    llm = LLM(model=str(chat_model_dir), dtype="float32", device="cpu", kv_cache_memory="16MiB", seed=0)
    torch.set_num_threads(1)
    return llm
