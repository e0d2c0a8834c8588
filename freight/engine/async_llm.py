"""AsyncLLM: the engine behind the server, driven by one background thread.

LLMEngine is not thread-safe, so exactly one thread (the "engine thread") ever
touches it. The asyncio side only appends to the add/abort queues (under a lock)
and reads the stats snapshot the engine thread publishes after every step.
Outputs go back to each request's asyncio.Queue through call_soon_threadsafe, one
call per step per event loop (not one per request: each call writes to the loop's
self-pipe, which adds up at 64+ concurrent requests).

`from_engine_config` builds the engine on the engine thread, so that it is the only
thread that ever runs torch ops. With a second OpenMP thread pool in the process (the
main thread's, had it loaded the model), libgomp sees more threads than CPUs and stops
spinning between parallel regions: every region then sleeps and wakes its workers, and
decode steps took 1.5-2x as long (16 against 24-35 ms at 4 sequences on 2 cores).

Failures stay local: an invalid request raises from add_request() in the caller's
thread (before anything is queued, so the server can answer 400 before a stream
starts); an exception inside step() fails the requests that were in flight, is
logged, and the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Union

from freight.config import EngineConfig
from freight.engine.llm_engine import EngineStats, LLMEngine, PromptError
from freight.outputs import RequestOutput
from freight.sampling_params import SamplingParams
from freight.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

PromptInput = Union[str, list[int], dict]


class EngineOverloadedError(RuntimeError):
    """The waiting queue is at its limit (the server answers 503)."""


class EngineShutdownError(RuntimeError):
    """The engine is shutting down; the request was refused or aborted (503)."""


class EngineStepError(RuntimeError):
    """A step of the engine failed while this request was in flight (500)."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; nothing more can run (503)."""


@dataclass
class _PendingAdd:
    request_id: str
    prompt: dict
    params: SamplingParams
    arrival_time: float


class RequestStream:
    """The outputs of one request, handed from the engine thread to an asyncio consumer.

    Iterate it (or await get()) until an output with finished=True; an exception put
    by the engine thread is raised to the consumer. abort() is synchronous on purpose:
    it is called from `finally` blocks of cancelled tasks, where awaiting is unsafe.
    """

    def __init__(self, request_id: str, owner: "AsyncLLM", loop: asyncio.AbstractEventLoop,
                 num_prompt_tokens: int):
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.loop = loop
        self.finished = False
        self._owner = owner
        self._queue: asyncio.Queue[Union[RequestOutput, BaseException]] = asyncio.Queue()
        self._stash: Optional[RequestOutput] = None

    def _put(self, item: Union[RequestOutput, BaseException]) -> None:  # on the loop's thread
        self._queue.put_nowait(item)

    async def get(self) -> RequestOutput:
        """The next output; when several are queued (a slow consumer), one output with their deltas joined."""
        if self._stash is not None:
            item, self._stash = self._stash, None
        else:
            item = await self._queue.get()
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            newer = self._queue.get_nowait()
            if isinstance(newer, RequestOutput) and len(newer.delta_text) != len(item.delta_text):
                self._stash = newer  # cannot be joined (never expected): hand it out next time
                break
            item = _merge(item, newer)
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        return await self.get()

    def abort(self) -> None:
        """Abort the request if it has not finished (a client hung up): its blocks are freed next step."""
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id)


class AsyncLLM:
    def __init__(self, engine: Union[LLMEngine, Callable[[], LLMEngine]], max_waiting: Optional[int] = None,
                 log_stats_interval: float = 10.0, log_requests: bool = True):
        """engine: a built LLMEngine, or a function that builds one (it runs on the engine thread)."""
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"max_waiting must be at least 1 (or None: no limit), got {max_waiting}")
        self.max_waiting = max_waiting
        self.log_stats_interval = log_stats_interval
        self.log_requests = log_requests
        # Called on the engine thread with every RequestOutput (metrics); must not raise or block.
        self.output_observers: list[Callable[[RequestOutput], None]] = []

        self._cv = threading.Condition(threading.Lock())
        self._adds: list[_PendingAdd] = []
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}   # requests whose consumer still listens
        self._in_engine: set[str] = set()               # engine thread only
        self._num_waiting = 0                           # in the scheduler's queue, updated under the lock
        self._stopping = False                          # refuse new requests
        self._exit = False                              # engine thread: return once idle
        self._dead: Optional[BaseException] = None

        build = engine if callable(engine) and not isinstance(engine, LLMEngine) else (lambda: engine)
        built = threading.Event()
        self._build_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(build, built), name="freight-engine", daemon=True)
        self._thread.start()
        built.wait()
        if self._build_error is not None:
            raise self._build_error
        self.max_model_len = self.engine.max_model_len
        # A tokenizer of our own for the event loop thread (chat templates, prompts, logprob
        # strings): the engine thread detokenizes with the engine's, and the Rust tokenizer
        # objects are not meant to be shared between threads.
        cfg = self.engine.config
        self.tokenizer = load_tokenizer(cfg.tokenizer or str(self.engine.model_dir), cfg.revision,
                                        cfg.trust_remote_code)

    @classmethod
    def from_engine_config(cls, config: EngineConfig, **kwargs) -> "AsyncLLM":
        """Build the engine on the engine thread (see the module docstring); its errors raise here."""
        return cls(lambda: LLMEngine(config), **kwargs)

    # -- the asyncio side ------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, dict) and "prompt_token_ids" not in prompt and "prompt" in prompt:
            return self.tokenize_prompt(prompt["prompt"])
        return self.engine.tokenize_prompt(prompt)  # token ids: no tokenizer involved

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                    arrival_time: Optional[float] = None) -> RequestStream:
        """Validate and queue a request; raises PromptError/ValueError (bad input), EngineOverloadedError,
        EngineShutdownError or EngineDeadError. Must be called on the event loop that consumes the stream."""
        text, ids = self.tokenize_prompt(prompt)
        self.engine.validate_request(ids, params)  # here, so bad input fails the caller, not the loop
        stream = RequestStream(request_id, self, asyncio.get_running_loop(), len(ids))
        with self._cv:
            if self._dead is not None:
                raise EngineDeadError(f"the engine has stopped: {self._dead}")
            if self._stopping:
                raise EngineShutdownError("the server is shutting down")
            if request_id in self._streams or any(a.request_id == request_id for a in self._adds):
                raise ValueError(f"request id {request_id!r} is already in use")
            if self.max_waiting is not None and self._num_waiting + len(self._adds) >= self.max_waiting:
                raise EngineOverloadedError(f"the server is overloaded: {self.max_waiting} requests are already "
                                            "waiting; retry later")
            self._streams[request_id] = stream
            self._adds.append(_PendingAdd(request_id, {"prompt": text, "prompt_token_ids": ids}, params,
                                          arrival_time if arrival_time is not None else time.monotonic()))
            self._cv.notify()
        return stream

    async def generate(self, prompt: PromptInput, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs; closing or cancelling the iterator aborts the request."""
        stream = self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Thread-safe and non-blocking; a no-op for unknown or finished requests."""
        with self._cv:
            self._streams.pop(request_id, None)
            pending = [a for a in self._adds if a.request_id == request_id]
            if pending:  # never reached the engine
                self._adds.remove(pending[0])
            else:
                self._aborts.append(request_id)
            self._cv.notify()

    def abort_all(self, error: BaseException) -> int:
        """Abort every request in flight, raising `error` to their consumers; returns how many."""
        with self._cv:
            streams, self._streams = self._streams, {}
            self._adds.clear()
            self._aborts.extend(streams)
            self._cv.notify()
        _deliver([(s, error) for s in streams.values()])
        return len(streams)

    def begin_shutdown(self) -> None:
        """Refuse new requests and abort those in flight (their clients get an error, not a hang)."""
        with self._cv:
            self._stopping = True
        n = self.abort_all(EngineShutdownError("the server is shutting down; the request was aborted"))
        if n:
            logger.info("shutdown: aborted %d in-flight request(s)", n)

    def shutdown(self, timeout: float = 10.0) -> None:
        self.begin_shutdown()
        with self._cv:
            self._exit = True
            self._cv.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def get_stats(self) -> EngineStats:
        return self._stats  # a snapshot, replaced (never mutated) by the engine thread

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    # -- the engine thread ---------------------------------------------------------
    def _run(self, build: Callable[[], LLMEngine], built: threading.Event) -> None:
        try:
            self.engine = build()
            self._stats: EngineStats = self.engine.get_stats()
        except BaseException as e:
            self._build_error = e
            return
        finally:
            built.set()
        try:
            self._loop()
        except BaseException as e:  # a bug in the loop itself: fail loudly, refuse new work
            logger.exception("engine loop died")
            self._dead = e
            self.abort_all(EngineDeadError(f"the engine loop died: {e}"))

    def _loop(self) -> None:
        stats_logger = _StatsLogger(self.log_stats_interval)
        while True:
            with self._cv:
                while not (self._adds or self._aborts or self._exit or self.engine.has_unfinished_requests()):
                    self._cv.wait(timeout=self.log_stats_interval or None)
                    stats_logger.maybe_log(self._stats)
                if self._exit and not (self._adds or self._aborts or self.engine.has_unfinished_requests()):
                    return
                aborts, self._aborts = self._aborts, []
                adds, self._adds = self._adds, []
                outputs: list[RequestOutput] = []
                for rid in aborts:
                    if rid in self._in_engine:
                        outputs.extend(self.engine.abort_request(rid))
                failed = []
                for a in adds:
                    try:
                        self.engine.add_request(a.request_id, a.prompt, a.params, a.arrival_time)
                        self._in_engine.add(a.request_id)
                    except Exception as e:  # validated already; whatever is left is the caller's fault
                        failed.append((self._streams.pop(a.request_id, None), e))
                self._num_waiting = len(self.engine.scheduler.waiting)
            _deliver([(s, e) for s, e in failed if s is not None])
            if self.engine.has_unfinished_requests():
                try:
                    outputs.extend(self.engine.step())
                except Exception as e:
                    self._fail_in_flight(e)
            self._dispatch(outputs)
            with self._cv:
                self._num_waiting = len(self.engine.scheduler.waiting)
            self._stats = self.engine.get_stats()
            stats_logger.maybe_log(self._stats)

    def _fail_in_flight(self, error: Exception) -> None:
        ids = sorted(self._in_engine)
        logger.exception("engine step failed; failing %d in-flight request(s): %s", len(ids), error)
        with self._cv:
            streams = [self._streams.pop(rid) for rid in ids if rid in self._streams]
        _deliver([(s, EngineStepError(f"the engine failed while running this request: "
                                      f"{type(error).__name__}: {error}")) for s in streams])
        try:  # free their blocks; if even that fails the engine is broken for good
            self._dispatch(self.engine.abort_request(ids))
        except Exception as e:
            raise RuntimeError(f"cannot recover from a failed step: {e}") from error
        self._in_engine.difference_update(ids)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        if not outputs:
            return
        for out in outputs:
            for observe in self.output_observers:
                try:
                    observe(out)
                except Exception:  # metrics must never take the engine down
                    logger.exception("output observer failed")
            if out.finished:
                self._in_engine.discard(out.request_id)
                if self.log_requests:
                    _log_finished(out)
        with self._cv:
            batch = []
            for out in outputs:
                stream = self._streams.pop(out.request_id, None) if out.finished else \
                    self._streams.get(out.request_id)
                if stream is not None:
                    batch.append((stream, out))
        _deliver(batch)


def _merge(older: RequestOutput, newer: Union[RequestOutput, BaseException]) -> Union[RequestOutput, BaseException]:
    """Fold two consecutive outputs of a request into one (the newer state, both deltas); an error wins."""
    if isinstance(newer, BaseException):
        return newer
    return dataclasses.replace(
        newer, delta_text=[a + b for a, b in zip(older.delta_text, newer.delta_text)],
        delta_token_ids=[a + b for a, b in zip(older.delta_token_ids, newer.delta_token_ids)])


def _deliver(items: list[tuple[RequestStream, Union[RequestOutput, BaseException]]]) -> None:
    """Put items on their streams' queues: one call_soon_threadsafe per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
    for stream, item in items:
        by_loop[stream.loop].append((stream, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _put_all(batch: list) -> None:
    for stream, item in batch:
        stream._put(item)


def _log_finished(out: RequestOutput) -> None:
    m = out.metrics
    reason = ",".join(sorted({c.finish_reason or "?" for c in out.outputs}))
    gen = sum(len(c.token_ids) for c in out.outputs)
    if m is None:
        logger.info("request %s finished (%s): prompt %d tokens, generated %d tokens",
                    out.request_id, reason, len(out.prompt_token_ids), gen)
        return
    ttft = f"{m.first_token_time - m.arrival_time:.3f}s" if m.first_token_time is not None else "-"
    e2e = (m.finished_time or time.monotonic()) - m.arrival_time
    logger.info("request %s finished (%s): prompt %d tokens (%d cached), generated %d tokens, TTFT %s, e2e %.3fs",
                out.request_id, reason, len(out.prompt_token_ids), out.num_cached_tokens, gen, ttft, e2e)


class _StatsLogger:
    """Periodic engine stats: throughput since the last line, queue sizes, KV cache usage."""

    def __init__(self, interval: float):
        self.interval = interval
        self._last_time = time.monotonic()
        self._last: Optional[EngineStats] = None

    def maybe_log(self, stats: EngineStats) -> None:
        now = time.monotonic()
        if not self.interval or now - self._last_time < self.interval:
            return
        last, dt = self._last, now - self._last_time
        self._last, self._last_time = stats, now
        prompt = stats.num_computed_prompt_tokens - (last.num_computed_prompt_tokens if last else 0)
        gen = stats.num_generated_tokens - (last.num_generated_tokens if last else 0)
        if not (prompt or gen or stats.num_running or stats.num_waiting):
            return  # idle: say nothing
        logger.info("engine: prompt %.1f tokens/s, generation %.1f tokens/s, running %d, waiting %d, "
                    "KV cache %.1f%% (%d/%d blocks free), preemptions %d, prefix cache hit rate %.1f%%",
                    prompt / dt, gen / dt, stats.num_running, stats.num_waiting, 100 * stats.kv_cache_usage,
                    stats.num_free_blocks, stats.num_total_blocks, stats.num_preemptions,
                    100 * stats.prefix_cache_hits / max(stats.prefix_cache_queries, 1))


__all__ = ["AsyncLLM", "RequestStream", "EngineOverloadedError", "EngineShutdownError", "EngineStepError",
           "EngineDeadError", "PromptError"]
