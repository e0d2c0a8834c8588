"""Engine-core clients: how a frontend reaches its engine core(s).

- InprocCoreClient: the EngineCore in the caller's thread; get_output() runs one step
  (the offline LLM: no threads, no IPC).
- ThreadCoreClient: one EngineCoreProc busy loop on a thread of this process (tests,
  embedding); inputs and outputs pass through in-memory queues.
- MPCoreClient: one engine-core process per data-parallel rank, spawned here (or, with
  the Ray backend, Ray actors: engine/ray_cores.py), over ZMQ with msgpack: a PUSH
  socket per engine for inputs, one PULL socket for every engine's outputs. A core that
  dies is noticed within a poll interval and raised as EngineDeadError from get_output().

Both take requests for a given engine index; choosing it is the frontend's job.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from typing import Optional

from freight.config import EngineConfig
from freight.ipc import send_while_alive
from freight.engine.messages import (CoreFinish, CoreUtility, EngineCoreOutputs, EngineCoreReady, EngineCoreRequest,
                                     RequestType, decode_output, encode)

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = float(os.environ.get("FREIGHT_ENGINE_STARTUP_TIMEOUT", 600))
_POLL_MS = 100


class EngineDeadError(RuntimeError):
    """The engine core has stopped; nothing more can run (503)."""


class CoreClient(ABC):
    engines: list[EngineCoreReady]  # one per engine core, in index order

    @property
    def max_model_len(self) -> int:
        return min(e.max_model_len for e in self.engines)

    def wait_ready(self) -> None:
        """Block until every engine core is ready to serve (raises if one failed to start)."""

    @abstractmethod
    def add_request(self, request: EngineCoreRequest, engine: int) -> None: ...

    @abstractmethod
    def finish_requests(self, request_ids: list[str], engine: int, stopped: bool = False) -> None: ...

    @abstractmethod
    def call_utility(self, method: str) -> None:
        """Run a no-argument EngineCore method (e.g. reset_prefix_cache) on every engine."""

    @abstractmethod
    def get_output(self, timeout: float) -> Optional[EngineCoreOutputs]:
        """The next outputs of any engine, None after timeout seconds; EngineDeadError once one has died."""

    @abstractmethod
    def shutdown(self, timeout: float = 10.0) -> None: ...


class InprocCoreClient(CoreClient):
    def __init__(self, config: EngineConfig):
        from freight.engine.core import EngineCore

        self.engine_core = EngineCore(config)
        self.engines = [self.engine_core.ready_message()]

    def add_request(self, request: EngineCoreRequest, engine: int) -> None:
        self.engine_core.add_request(request)

    def finish_requests(self, request_ids: list[str], engine: int, stopped: bool = False) -> None:
        self.engine_core.finish_requests(request_ids, stopped)

    def call_utility(self, method: str) -> None:
        getattr(self.engine_core, method)()

    def get_output(self, timeout: float = 0.0) -> Optional[EngineCoreOutputs]:
        if not self.engine_core.has_unfinished_requests():
            return None
        return self.engine_core.step()

    def shutdown(self, timeout: float = 10.0) -> None:
        self.engine_core.shutdown()


class ThreadCoreClient(CoreClient):
    def __init__(self, config: EngineConfig):
        from freight.engine.core import EngineCore
        from freight.engine.core_proc import EngineCoreProc

        self._inputs: queue.Queue = queue.Queue()
        self._outputs: queue.Queue[EngineCoreOutputs] = queue.Queue()
        self._error: Optional[BaseException] = None
        built = threading.Event()

        def run() -> None:  # the core is built on its thread: the only one that runs torch ops
            try:
                self.engine_core = EngineCore(config)
            except BaseException as e:
                self._error = e
                return
            finally:
                built.set()
            try:
                EngineCoreProc(self.engine_core, self._inputs, self._outputs.put).run_busy_loop()
            except BaseException as e:
                logger.exception("engine core loop died")
                self._error = e

        self._thread = threading.Thread(target=run, name="freight-engine", daemon=True)
        self._thread.start()
        built.wait()
        if self._error is not None:
            raise self._error
        self.engines = [self.engine_core.ready_message()]

    def add_request(self, request: EngineCoreRequest, engine: int) -> None:
        self._inputs.put((RequestType.ADD, request))

    def finish_requests(self, request_ids: list[str], engine: int, stopped: bool = False) -> None:
        self._inputs.put((RequestType.ABORT, CoreFinish(request_ids, stopped)))

    def call_utility(self, method: str) -> None:
        self._inputs.put((RequestType.UTILITY, CoreUtility(method)))

    def get_output(self, timeout: float) -> Optional[EngineCoreOutputs]:
        try:
            return self._outputs.get(timeout=timeout)
        except queue.Empty:
            if not self._thread.is_alive():
                raise EngineDeadError(f"the engine core stopped: {self._error}") from self._error
            return None

    def shutdown(self, timeout: float = 10.0) -> None:
        self._inputs.put((RequestType.SHUTDOWN, None))
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


class MPCoreClient(CoreClient):
    def __init__(self, config: EngineConfig, data_parallel_size: int = 1, log_level: int = logging.INFO):
        import zmq

        # With the Ray backend, data-parallel cores are Ray actors the cluster places, reached over TCP.
        self._ray_cores = config.distributed_executor_backend == "ray" and data_parallel_size > 1
        self._owns_ray = False
        if self._ray_cores:
            from freight.engine.ray_cores import ensure_ray

            self._owns_ray = ensure_ray()
        self._ctx = zmq.Context()
        self._dir = tempfile.mkdtemp(prefix="freight-ipc-")
        self._out = self._ctx.socket(zmq.PULL)
        out_addr = self._bind(self._out, "out")
        self._ins, self._procs = [], []
        self._send_lock = threading.Lock()  # ZMQ sockets are not thread-safe
        self._closing = False
        spawn = multiprocessing.get_context("spawn")
        for i, (cfg, cpus) in enumerate(_split_for_data_parallel(config, data_parallel_size)):
            sock = self._ctx.socket(zmq.PUSH)
            addr = self._bind(sock, f"in{i}")
            self._ins.append(sock)
            if self._ray_cores:
                from freight.engine.ray_cores import RayCoreProcess

                self._procs.append(RayCoreProcess(cfg, i, addr, out_addr, log_level))
                continue
            # A daemonic process may not start processes of its own: a core with tensor-parallel
            # ranks is not one (it exits by itself within 0.5 s if this process goes away).
            proc = spawn.Process(target=_core_main, args=(cfg, i, addr, out_addr, cpus, log_level),
                                 name=f"freight-engine-core-{i}", daemon=config.tensor_parallel_size == 1)
            proc.start()
            self._procs.append(proc)
        self.engines: list[EngineCoreReady] = []

    def _bind(self, sock, name: str) -> str:
        """Bind an IPC file here, or (Ray cores, possibly on other nodes) a TCP port at this node's address."""
        if self._ray_cores:
            from freight.engine.ray_cores import node_address

            host = node_address()
            return f"tcp://{host}:{sock.bind_to_random_port(f'tcp://{host}')}"
        addr = f"ipc://{self._dir}/{name}"
        sock.bind(addr)
        return addr

    def wait_ready(self) -> None:
        try:
            self.engines = self._wait_ready(len(self._procs))
        except BaseException:
            self.shutdown(timeout=2)
            raise

    def _wait_ready(self, n: int) -> list[EngineCoreReady]:
        ready: dict[int, EngineCoreReady] = {}
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while len(ready) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine cores not ready after {STARTUP_TIMEOUT_S:.0f}s")
            if self._out.poll(_POLL_MS):
                msg = decode_output(self._out.recv())
                if isinstance(msg, EngineCoreReady):
                    if msg.error:
                        raise RuntimeError(f"engine core {msg.engine_index} failed to start: {msg.error}")
                    ready[msg.engine_index] = msg
            else:
                self._check_alive()
        return [ready[i] for i in range(n)]

    def _check_alive(self) -> None:
        for i, p in enumerate(self._procs):
            if not p.is_alive() and not self._closing:
                raise EngineDeadError(f"engine core {i} (pid {p.pid}) died with exit code {p.exitcode}")

    def _send(self, engine: int, kind: RequestType, payload) -> None:
        def check_alive() -> None:
            proc = self._procs[engine]
            if not proc.is_alive():
                raise EngineDeadError(f"engine core {engine} (pid {proc.pid}) died with exit code {proc.exitcode}")

        with self._send_lock:
            send_while_alive(self._ins[engine], [bytes([kind]), encode(payload)], check_alive)

    def add_request(self, request: EngineCoreRequest, engine: int) -> None:
        self._send(engine, RequestType.ADD, request)

    def finish_requests(self, request_ids: list[str], engine: int, stopped: bool = False) -> None:
        try:
            self._send(engine, RequestType.ABORT, CoreFinish(request_ids, stopped))
        except EngineDeadError:
            pass  # a dead core holds nothing to abort

    def call_utility(self, method: str) -> None:
        for i in range(len(self._ins)):
            self._send(i, RequestType.UTILITY, CoreUtility(method))

    def get_output(self, timeout: float) -> Optional[EngineCoreOutputs]:
        deadline = time.monotonic() + timeout
        while True:
            if self._out.poll(min(_POLL_MS, max(int((deadline - time.monotonic()) * 1000), 0))):
                msg = decode_output(self._out.recv())
                if isinstance(msg, EngineCoreOutputs):
                    return msg
                continue
            self._check_alive()
            if time.monotonic() >= deadline:
                return None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._closing:
            return
        self._closing = True
        for i, p in enumerate(self._procs):
            if p.is_alive():
                try:
                    self._send(i, RequestType.SHUTDOWN, None)
                except Exception:
                    pass
        deadline = time.monotonic() + timeout
        for p in self._procs:
            p.join(max(deadline - time.monotonic(), 0.1))
            if p.is_alive():
                logger.warning("engine core pid %d did not stop in time; killing it", p.pid)
                p.kill()
                p.join(1)
        for s in (*self._ins, self._out):
            s.close(linger=0)
        self._ctx.term()
        for name in os.listdir(self._dir):
            os.unlink(os.path.join(self._dir, name))
        os.rmdir(self._dir)
        if self._owns_ray:
            import ray

            ray.shutdown()


def _core_main(*args) -> None:
    from freight.engine.core_proc import run_engine_core

    run_engine_core(*args)


def _split_for_data_parallel(config: EngineConfig, n: int) -> list[tuple[EngineConfig, Optional[list[int]]]]:
    """Each engine's config and CPUs: with several, the CPUs are split between them (OpenMP pools
    that share cores slow each other down) unless num_threads was given."""
    import dataclasses

    if n == 1:
        return [(config, None)]
    cpus = sorted(os.sched_getaffinity(0))
    if config.num_threads is not None or len(cpus) < n:
        return [(config, None)] * n
    share = len(cpus) // n
    # (with tensor parallelism the core's executor splits its CPUs further, between its ranks)
    threads = share if config.tensor_parallel_size == 1 else None
    return [(dataclasses.replace(config, num_threads=threads), cpus[i * share:(i + 1) * share]) for i in range(n)]


def make_client(config: EngineConfig, data_parallel_size: int = 1, multiprocess: bool = True,
                log_level: int = logging.INFO, threaded: bool = True) -> CoreClient:
    """The engine core(s) for a frontend; an MPCoreClient is still starting: call wait_ready().

    Without multiprocess the core runs on a thread of its own (threaded: an asynchronous frontend)
    or in the caller's thread (a synchronous one, stepping it through get_output)."""
    if not multiprocess:
        if data_parallel_size != 1 or config.tensor_parallel_size != 1:
            raise ValueError("data and tensor parallelism need the engine cores in their own processes")
        return ThreadCoreClient(config) if threaded else InprocCoreClient(config)
    return MPCoreClient(config, data_parallel_size, log_level)
