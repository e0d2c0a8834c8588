"""AsyncLLM: the server's frontend, with the engine core(s) in their own processes.

This process tokenizes, validates, detokenizes, matches stop strings and streams;
the engine-core processes (one per data-parallel rank) schedule and run the model and
are the only ones that touch torch. New requests go to the least loaded core (its
unfinished requests, as this frontend counts them).

Threads: callers (asyncio event loops) add and abort requests under one lock; one
output thread receives every core's EngineCoreOutputs, turns them into RequestOutputs
(detokenizing off the event loop, with a tokenizer of its own: the Rust tokenizer
objects are not meant to be shared between threads) and hands them to each request's
asyncio.Queue with one call_soon_threadsafe per event loop and batch (not one per
request: each call writes to the loop's self-pipe, which adds up at 64+ streams).

Failures stay local: an invalid request raises from add_request() in the caller's
thread (before anything is queued, so the server can answer 400 before a stream
starts); a step that fails in a core fails the requests that core had in flight, and
it keeps serving. A core process that dies fails every request in flight with
EngineDeadError, marks the engine unhealthy and calls the on_dead callbacks (the
server then exits non-zero).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator, Callable, Optional, Union

from freight.config import EngineConfig
from freight.core.stats import SchedulerStats
from freight.core.status import EngineCoreStatus
from freight.engine.core_client import CoreClient, EngineDeadError, make_client
from freight.engine.engine_router import EngineRouter
from freight.engine.messages import EngineCoreOutputs
from freight.engine.output_processor import OutputProcessor
from freight.engine.processor import InputProcessor, PromptError, sequence_ids
from freight.engine.request_stream import RequestStream, deliver
from freight.engine.serving_log import StatsLogger, log_finished
from freight.model_config import ModelConfig
from freight.model_loader import resolve_model_dir
from freight.outputs import EmbeddingRequestOutput, RequestOutput
from freight.pooling_params import PoolingParams
from freight.sampling_params import SamplingParams
from freight.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

PromptInput = Union[str, list[int], dict]
EngineStats = SchedulerStats


class EngineOverloadedError(RuntimeError):
    """The waiting queue is at its limit (the server answers 503)."""


class EngineShutdownError(RuntimeError):
    """The engine is shutting down; the request was refused or aborted (503)."""


class EngineStepError(RuntimeError):
    """A step of the engine failed while this request was in flight (500)."""


class AsyncLLM:
    def __init__(self, config: EngineConfig, data_parallel_size: int = 1, multiprocess: bool = True,
                 max_waiting: Optional[int] = None, log_stats_interval: float = 10.0, log_requests: bool = True):
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"max_waiting must be at least 1 (or None: no limit), got {max_waiting}")
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be at least 1, got {data_parallel_size}")
        self.config = config
        self.max_waiting = max_waiting
        self.log_stats_interval = log_stats_interval
        self.log_requests = log_requests
        # Called on the output thread with every RequestOutput (metrics); must not raise or block.
        self.output_observers: list[Callable[[RequestOutput], None]] = []
        # Called once, on the output thread, if an engine core dies.
        self.on_dead: list[Callable[[BaseException], None]] = []

        self.model_dir = resolve_model_dir(config.model, config.revision)
        model_config = ModelConfig.from_dir(self.model_dir)
        model_config.check_tensor_parallel(config.tensor_parallel_size)  # before any process starts
        self.client: CoreClient = make_client(config, data_parallel_size, multiprocess,
                                              log_level=logging.getLogger("freight").getEffectiveLevel())
        try:
            # One tokenizer per thread that uses one (the Rust tokenizer objects are not meant to be shared
            # between threads): the callers' event loop (logprob strings, small decodes), the server's
            # prompt-preparation thread (prep_tokenizer), the output thread (detokenization). They load
            # while the engine cores start.
            self.tokenizer, self.prep_tokenizer, detokenizer = (
                load_tokenizer(config.tokenizer or str(self.model_dir), config.revision, config.trust_remote_code)
                for _ in range(3))
            self.client.wait_ready()
        except BaseException:
            self.client.shutdown(timeout=2)
            raise
        self.max_model_len = self.client.max_model_len
        self.processor = InputProcessor(config, self.tokenizer, model_config.vocab_size,
                                        eos_token_ids(self.model_dir, self.tokenizer), self.max_model_len,
                                        model_dir=self.model_dir)
        self.output_processor = OutputProcessor(detokenizer)

        self._lock = threading.Lock()
        self._streams: dict[str, RequestStream] = {}  # requests whose consumer still listens
        self._router = EngineRouter(data_parallel_size)
        # Each core's latest status snapshot (only sent while want_status is renewed: the status page).
        self._engine_status: list[Optional[EngineCoreStatus]] = [None] * data_parallel_size
        self._stopping = False                         # refuse new requests
        self._exit = False
        self._dead: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run_output_loop, name="freight-output", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_config(cls, config: EngineConfig, **kwargs) -> "AsyncLLM":
        return cls(config, **kwargs)

    @property
    def data_parallel_size(self) -> int:
        return self._router.num_engines

    # -- the callers' side ------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[Optional[str], list[int]]:
        return self.processor.tokenize_prompt(prompt)

    def validate_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.processor.validate_request(prompt_ids, params)

    def _check_admission(self, request_id: str, seq_ids: list[str]) -> None:
        """Raise if a new request cannot be taken now (called under the lock)."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self._dead}")
        if self._stopping:
            raise EngineShutdownError("the server is shutting down")
        if request_id in self._router or self.output_processor.in_use(seq_ids):
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.max_waiting is not None and self._router.num_waiting() >= self.max_waiting:
            raise EngineOverloadedError(f"the server is overloaded: {self.max_waiting} requests are already "
                                        "waiting; retry later")

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                    arrival_time: Optional[float] = None, priority: int = 0) -> RequestStream:
        """Validate and queue a request; raises PromptError/ValueError (bad input), EngineOverloadedError,
        EngineShutdownError or EngineDeadError. Must be called on the event loop that consumes the stream."""
        text, ids = self.tokenize_prompt(prompt)
        self.validate_request(ids, params)  # here, so bad input fails the caller, not the engine
        stream = RequestStream(request_id, self, asyncio.get_running_loop(), len(ids))
        with self._lock:
            self._check_admission(request_id, sequence_ids(request_id, params))
            req = self.processor.make_request(request_id, ids, params, arrival_time, priority)
            self.output_processor.add_request(request_id, [req.request_id, *req.fork_ids], text, ids, params,
                                              req.arrival_time)
            self._streams[request_id] = stream
            self.client.add_request(req, self._router.assign(request_id))
        return stream

    def add_pooling_request(self, request_id: str, prompt: PromptInput, params: PoolingParams,
                            arrival_time: Optional[float] = None) -> RequestStream:
        """Queue an embedding request (params resolved: processor.resolve_pooling_params); its stream
        yields one EmbeddingRequestOutput. Raises as add_request does."""
        text, ids = self.tokenize_prompt(prompt)
        req = self.processor.make_pooling_request(request_id, ids, params, arrival_time)
        stream = RequestStream(request_id, self, asyncio.get_running_loop(), len(ids))
        with self._lock:
            self._check_admission(request_id, [request_id])
            self.output_processor.add_pooling_request(request_id, text, ids, req.arrival_time)
            self._streams[request_id] = stream
            self.client.add_request(req, self._router.assign(request_id))
        return stream

    async def encode(self, prompt: PromptInput, params: PoolingParams, request_id: str):
        """The request's EmbeddingRequestOutput (vLLM's name); cancelling aborts the request."""
        stream = self.add_pooling_request(request_id, prompt, params)
        try:
            return await stream.get()
        finally:
            stream.abort()

    async def generate(self, prompt: PromptInput, params: SamplingParams,
                       request_id: str, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs; closing or cancelling the iterator aborts the request."""
        stream = self.add_request(request_id, prompt, params, priority=priority)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Thread-safe and non-blocking; a no-op for unknown or finished requests."""
        with self._lock:
            self._streams.pop(request_id, None)
            final = self._forget(request_id)
        if final is not None:
            self._observe([final])

    def _forget(self, request_id: str, reason: str = "abort") -> Optional[RequestOutput]:
        """Drop an unfinished request here (under the lock), aborting it in its core."""
        engine = self._router.release(request_id)
        if engine is None:
            return None
        seq_ids = self.output_processor.sequence_ids(request_id)
        final = self.output_processor.finish(request_id, reason)
        if self._dead is None:
            self.client.finish_requests(seq_ids, engine)
        return final

    def abort_all(self, error: BaseException) -> int:
        """Abort every request in flight, raising `error` to their consumers; returns how many."""
        with self._lock:
            streams, self._streams = self._streams, {}
            finals = [self._forget(rid) for rid in list(self._router.engine_of)]
        self._observe([f for f in finals if f is not None])
        deliver([(s, error) for s in streams.values()])
        return len(streams)

    def stop_accepting(self) -> None:
        """Refuse new requests (503); those in flight carry on (a graceful drain)."""
        with self._lock:
            self._stopping = True

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return self._router.num_unfinished

    def begin_shutdown(self) -> None:
        """Refuse new requests and abort those in flight (their clients get an error, not a hang)."""
        self.stop_accepting()
        n = self.abort_all(EngineShutdownError("the server is shutting down; the request was aborted"))
        if n:
            logger.info("shutdown: aborted %d in-flight request(s)", n)

    def shutdown(self, timeout: float = 10.0) -> None:
        self.begin_shutdown()
        self._exit = True
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.client.shutdown(timeout)

    def reset_prefix_cache(self) -> None:
        self.client.call_utility("reset_prefix_cache")

    def get_stats(self) -> SchedulerStats:
        """Totals over every engine core, as of each one's last step."""
        return self._router.total_stats()

    def get_engine_stats(self) -> list[SchedulerStats]:
        return list(self._router.stats)

    def want_status(self) -> None:
        """Have every engine core send status snapshots for the next few seconds (core/status.py)."""
        self.client.call_utility("want_status")

    def get_engine_status(self) -> list[Optional[EngineCoreStatus]]:
        """Each engine core's latest status snapshot (None until it has sent one)."""
        return list(self._engine_status)

    @property
    def is_stopping(self) -> bool:
        """True once shutdown has begun (long-lived streams such as the status page's end then)."""
        return self._stopping

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    # -- the output thread -------------------------------------------------------
    def _run_output_loop(self) -> None:
        stats_logger = StatsLogger(self.log_stats_interval)
        while not self._exit:
            try:
                outs = self.client.get_output(timeout=0.2)
            except EngineDeadError as e:
                if not self._exit:
                    self._die(e)
                return
            except Exception as e:  # a bug here: fail loudly rather than hang every stream
                logger.exception("output thread died")
                self._die(e)
                return
            if outs is not None:
                self._handle_outputs(outs)
            stats_logger.maybe_log(self.get_stats())

    def _handle_outputs(self, outs: EngineCoreOutputs) -> None:
        failed, deliveries = [], []
        with self._lock:
            self._router.record(outs)
            if outs.status is not None:
                self._engine_status[outs.engine_index] = outs.status
            normal = [o for o in outs.outputs if o.finish_reason != "error"]
            for o in outs.outputs:
                rid = self.output_processor.owner(o.request_id)
                if o.finish_reason == "error" and rid is not None:  # fail the whole request (every sequence)
                    failed.append((self._streams.pop(rid, None), self._forget(rid, "error"), rid, o.error))
            outputs, stopped = self.output_processor.process_outputs(normal)
            if stopped:  # stop strings: the text is final, free the sequences' blocks now
                self.client.finish_requests(stopped, outs.engine_index, stopped=True)
            for out in outputs:
                if out.finished:
                    self._router.release(out.request_id)
                    stream = self._streams.pop(out.request_id, None)
                else:
                    stream = self._streams.get(out.request_id)
                if stream is not None:
                    deliveries.append((stream, out))
        for stream, final, rid, why in failed:
            logger.error("request %s failed in the engine: %s", rid, why)
            if stream is not None:
                deliveries.append((stream, EngineStepError(f"the engine failed while running this request: {why}")))
            if final is not None:
                outputs.append(final)
        self._observe(outputs)
        deliver(deliveries)

    def _observe(self, outputs: list[Union[RequestOutput, EmbeddingRequestOutput]]) -> None:
        """Hand each output to the observers (metrics, status page) and log finished requests. Observers
        get embedding outputs too (prompt tokens, latency), and skip what does not apply to them."""
        for out in outputs:
            for observe in self.output_observers:
                try:
                    observe(out)
                except Exception:  # metrics must never take the engine down
                    logger.exception("output observer failed")
            if out.finished and self.log_requests:
                log_finished(out)

    def _die(self, error: BaseException) -> None:
        logger.error("engine died: %s; failing every request in flight", error)
        self._dead = error
        self.abort_all(EngineDeadError(f"the engine has stopped: {error}"))
        for callback in self.on_dead:
            try:
                callback(error)
            except Exception:
                logger.exception("on_dead callback failed")


__all__ = ["AsyncLLM", "RequestStream", "EngineOverloadedError", "EngineShutdownError", "EngineStepError",
           "EngineDeadError", "EngineStats", "PromptError"]
