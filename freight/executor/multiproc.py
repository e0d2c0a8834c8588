"""MultiprocExecutor: tensor-parallel ranks 1..N-1 as processes of this host.

Calls go out over one ZMQ PUSH socket per rank (msgpack frames of worker_calls), replies
come back on one PULL socket. A monitor thread watches the processes: one that dies
kills the group at once (ranks waiting in a collective are released), and a rank
whose engine-core process disappears exits by itself.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from freight.distributed.parallel_state import DistributedInit
from freight.executor.distributed import DistributedExecutor, ExecutorDeadError, RankPlan
from freight.executor.worker_calls import (REPLIED, Shutdown, WorkerCall, WorkerReply, decode_call, decode_reply,
                                           encode, handle)
from freight.ipc import send_while_alive
from freight.model_config import ModelConfig

logger = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 600.0
_POLL_MS = 200


class MultiprocExecutor(DistributedExecutor):
    def _launch(self, plans: list[RankPlan], model_dir: Path, model_config: ModelConfig) -> DistributedInit:
        import zmq

        init = self.distributed_init(self.world_size, "127.0.0.1", same_host=True,
                                     device_type=_device_type(self.config.device))
        self._ctx = zmq.Context()
        self._dir = tempfile.mkdtemp(prefix="freight-tp-")
        self._replies_sock = self._ctx.socket(zmq.PULL)
        reply_addr = f"ipc://{self._dir}/replies"
        self._replies_sock.bind(reply_addr)
        self._calls, self._procs = [], []
        spawn = multiprocessing.get_context("spawn")
        for plan in plans:
            sock = self._ctx.socket(zmq.PUSH)
            addr = f"ipc://{self._dir}/calls{plan.rank}"
            sock.bind(addr)
            self._calls.append(sock)
            proc = spawn.Process(target=run_worker, name=f"freight-tp-rank-{plan.rank}", daemon=True,
                                 args=(plan, model_dir, model_config, init, addr, reply_addr, logging.root.level))
            proc.start()
            self._procs.append(proc)
        threading.Thread(target=self._monitor, daemon=True, name="freight-tp-monitor").start()
        self._collect("start")  # each rank is about to join; rank 0's joining completes the group
        return init

    def _monitor(self) -> None:
        sentinels = {p.sentinel: p for p in self._procs}
        while sentinels and not self._closed:
            for s in multiprocessing.connection.wait(list(sentinels), timeout=1.0):
                p = sentinels.pop(s)
                self._mark_dead(f"{p.name} (pid {p.pid}) exited with code {p.exitcode}")

    def _collect(self, what: str, timeout: float = _STARTUP_TIMEOUT_S) -> list[Optional[int]]:
        got: dict[int, Optional[int]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self._procs):
            if self._dead is not None:
                raise ExecutorDeadError(f"while waiting for the ranks to {what}: {self._dead}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel ranks did not {what} within {timeout:.0f}s")
            if self._replies_sock.poll(_POLL_MS):
                reply: WorkerReply = decode_reply(self._replies_sock.recv())
                if reply.error is not None:
                    self._mark_dead(f"rank {reply.rank} failed: {reply.error}")
                    raise ExecutorDeadError(f"tensor-parallel rank {reply.rank} could not {what}: {reply.error}")
                got[reply.rank] = reply.value
        return [got[r] for r in sorted(got)]

    def _wait_loaded(self) -> None:
        self._collect("load the model")

    def _send(self, call: WorkerCall) -> None:
        frame = encode(call)
        for sock in self._calls:  # (a rank that died is marked dead by the monitor thread)
            send_while_alive(sock, [frame], self._check_alive)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise ExecutorDeadError(self._dead)

    def _replies(self) -> list[Optional[int]]:
        return self._collect("reply")

    def _stop_workers(self) -> None:
        deadline = time.monotonic() + 10
        for p in getattr(self, "_procs", []):
            p.join(max(deadline - time.monotonic(), 0.1))
            if p.is_alive():
                logger.warning("%s did not stop in time; killing it", p.name)
                p.kill()
                p.join(1)
        if hasattr(self, "_ctx"):
            for s in (*self._calls, self._replies_sock):
                s.close(linger=0)
            self._ctx.term()
            shutil.rmtree(self._dir, ignore_errors=True)


def _device_type(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


# -- a rank's process ------------------------------------------------------------------
def run_worker(plan: RankPlan, model_dir: Path, model_config: ModelConfig, init: DistributedInit,
               call_addr: str, reply_addr: str, log_level: int) -> None:
    """Process entry point of rank > 0: join the group, build the model, carry out calls until Shutdown."""
    import signal

    import zmq

    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [tp rank {plan.rank}] "
                                                "%(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine core coordinates shutdown
    if plan.cpus:
        os.sched_setaffinity(0, plan.cpus)
    ctx = zmq.Context()
    calls = ctx.socket(zmq.PULL)
    calls.connect(call_addr)
    replies = ctx.socket(zmq.PUSH)
    replies.connect(reply_addr)
    parent = os.getppid()

    def reply(value: Optional[int] = None, error: Optional[str] = None) -> None:
        replies.send(encode(WorkerReply(plan.rank, value, error)))

    from freight.worker.worker import Worker

    reply()  # started: joining the group now
    try:
        worker = Worker(plan.config, model_dir, model_config, plan.rank, init)
    except Exception as e:
        logger.exception("rank %d could not start", plan.rank)
        reply(error=f"{type(e).__name__}: {e}")
        replies.close(linger=2000)
        raise SystemExit(1)
    reply()  # loaded
    while True:
        if not calls.poll(500):
            if os.getppid() != parent:  # the engine core is gone: nobody will send Shutdown
                logger.warning("engine core is gone; rank %d exits", plan.rank)
                break
            continue
        call = decode_call(calls.recv())
        if isinstance(call, Shutdown):
            break
        try:
            value = handle(worker, call)
        except Exception as e:
            # This rank's state no longer matches rank 0's: the group cannot go on.
            logger.exception("rank %d failed a call", plan.rank)
            reply(error=f"{type(e).__name__}: {e}")
            replies.close(linger=2000)
            raise SystemExit(1)
        if isinstance(call, REPLIED):
            reply(value)
    from freight.distributed.parallel_state import destroy_tensor_parallel

    destroy_tensor_parallel()
    for s in (calls, replies):
        s.close(linger=1000)
    ctx.term()
