"""EngineCoreProc: an EngineCore in a busy loop, fed by a queue, and its process entry point.

The loop takes every pending input (adds, aborts, utility calls), runs one step if any
request is unfinished, and emits the step's EngineCoreOutputs; with nothing to do it
blocks on the input queue. It never does I/O itself: in its own process
(run_engine_core) two threads move msgpack frames between ZMQ sockets and the
queues, so a step never waits on a socket and the step thread is the only one that
runs torch ops (a second OpenMP pool would stop libgomp spinning and slow every step).

A step that raises fails the requests in flight: they are aborted (their blocks freed,
the prefix cache forgotten) and reported with finish_reason "error"; the loop goes on.
A request whose own preparation or sampling fails is failed alone by the runner. SHUTDOWN aborts
everything and returns.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from typing import Callable, Optional

from freight.config import EngineConfig
from freight.engine.core import EngineCore
from freight.executor.distributed import ExecutorDeadError
from freight.engine.messages import (EngineCoreOutput, EngineCoreOutputs, EngineCoreReady, RequestType,
                                     decode_input, encode)

logger = logging.getLogger(__name__)

CoreInputItem = tuple[RequestType, object]


class EngineCoreProc:
    def __init__(self, core: EngineCore, inputs: "queue.Queue[CoreInputItem]",
                 emit: Callable[[EngineCoreOutputs], None]):
        self.core = core
        self.inputs = inputs
        self.emit = emit
        self._stats_due = False  # inputs changed the queues since the last outputs went out

    def run_busy_loop(self) -> None:
        while True:
            if not self._process_inputs(block=not self.core.has_unfinished_requests()):
                self.core.abort_all()
                return
            if self.core.has_unfinished_requests():
                self._step()
            elif self._stats_due:  # (a status page's want_status also gets its snapshot of the idle core here)
                self.emit(EngineCoreOutputs(self.core.engine_index, [], self.core.make_stats(),
                                            self.core.due_status()))
            self._stats_due = False

    def _process_inputs(self, block: bool) -> bool:
        """Handle every queued input (waiting for one if block); False on SHUTDOWN."""
        try:
            item = self.inputs.get(block=block)
        except queue.Empty:
            return True
        while True:
            kind, payload = item
            if kind == RequestType.SHUTDOWN:
                return False
            self._handle(kind, payload)
            try:
                item = self.inputs.get_nowait()
            except queue.Empty:
                return True

    def _handle(self, kind: RequestType, payload) -> None:
        self._stats_due = True
        if kind == RequestType.ADD:
            try:
                self.core.add_request(payload)
            except Exception as e:  # validated by the frontend already; report instead of dying
                logger.exception("could not add request %s", payload.request_id)
                self.emit(EngineCoreOutputs(self.core.engine_index,
                                            [_error_output(payload.request_id, f"{type(e).__name__}: {e}")]))
        elif kind == RequestType.ABORT:
            self.core.finish_requests(payload.request_ids, payload.stopped)
        elif kind == RequestType.UTILITY:
            getattr(self.core, payload.method)()

    def _step(self) -> None:
        try:
            outputs = self.core.step()
        except ExecutorDeadError:
            raise  # a tensor-parallel rank is gone: this core cannot step again, so it dies
        except Exception as e:
            logger.exception("engine step failed; failing the requests in flight")
            failed = self.core.recover_from_failed_step()  # if even that raises, the core is dead
            why = f"the engine step failed: {type(e).__name__}: {e}"
            outputs = EngineCoreOutputs(self.core.engine_index, [_error_output(rid, why) for rid in failed],
                                        self.core.make_stats())
        self.emit(outputs)


def _error_output(request_id: str, error: str) -> EngineCoreOutput:
    return EngineCoreOutput(request_id, [], [], finish_reason="error", error=error)


# -- the engine-core process ---------------------------------------------------------------
def run_engine_core(config: EngineConfig, engine_index: int, input_address: str, output_address: str,
                    cpus: Optional[list[int]] = None, log_level: int = logging.INFO,
                    watch_parent: bool = True) -> None:
    """Process entry point: build the core, say READY on the output socket, serve until SHUTDOWN.

    watch_parent: exit when the parent process (the API process) goes away; a Ray actor's parent
    is Ray's, and Ray itself ends the actor with the driver that owns it."""
    import zmq

    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [engine {engine_index}] "
                                                "%(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process coordinates shutdown
    if cpus:
        os.sched_setaffinity(0, cpus)
    ctx = zmq.Context()
    out_sock = ctx.socket(zmq.PUSH)
    out_sock.connect(output_address)
    try:
        core = EngineCore(config, engine_index)
    except Exception as e:
        logger.exception("engine core failed to start")
        out_sock.send(encode(EngineCoreReady(engine_index, error=f"{type(e).__name__}: {e}")))
        out_sock.close(linger=2000)
        raise SystemExit(1)
    out_sock.send(encode(core.ready_message()))

    inputs: queue.Queue[CoreInputItem] = queue.Queue()
    outputs: queue.Queue[Optional[bytes]] = queue.Queue()
    parent = os.getppid() if watch_parent else None
    threading.Thread(target=_receive_inputs, args=(ctx, input_address, inputs, parent), daemon=True,
                     name="freight-core-in").start()
    sender = threading.Thread(target=_send_outputs, args=(out_sock, outputs), daemon=True, name="freight-core-out")
    sender.start()
    EngineCoreProc(core, inputs, lambda o: outputs.put(encode(o))).run_busy_loop()
    outputs.put(None)
    sender.join(5)
    core.shutdown()
    logger.info("engine core stopped")


def _receive_inputs(ctx, address: str, inputs: "queue.Queue[CoreInputItem]", parent: Optional[int]) -> None:
    import zmq

    sock = ctx.socket(zmq.PULL)
    sock.connect(address)
    while True:
        if not sock.poll(500):
            # the API process is gone: nobody will ever read our outputs
            if parent is not None and os.getppid() != parent:
                inputs.put((RequestType.SHUTDOWN, None))
                return
            continue
        kind_frame, payload = sock.recv_multipart()
        kind = RequestType(kind_frame[0])
        inputs.put((kind, decode_input(kind, payload)))
        if kind == RequestType.SHUTDOWN:
            return


def _send_outputs(sock, outputs: "queue.Queue[Optional[bytes]]") -> None:
    while (frame := outputs.get()) is not None:
        sock.send(frame, copy=False)
    sock.close(linger=5000)


