"""StructuredOutputManager: compiles grammars off the step loop and fills each step's bitmask.

Lives in the engine core beside the scheduler. A constrained request's grammar compiles
on a small thread pool (an LRU cache keyed on backend and spec shares the work between
requests with the same schema); the scheduler leaves the request waiting, without
blocking the others, until its grammar is ready. Each sequence (every sample of an n > 1
request) gets its own matcher, which the scheduler advances with the sampled tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from freight.sampling_params import StructuredOutputsParams
from freight.structured_output.backend import Backend, Matcher, bitmask_words, choose_backend, with_defaults

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class StructuredOutputRequest:
    """A sequence's constraint: its compiled grammar (once ready) and its own matcher."""

    spec: StructuredOutputsParams
    backend: str
    compiled: "Future[Any]"
    matcher: Optional[Matcher] = None
    error: Optional[str] = None
    _manager: Optional["StructuredOutputManager"] = field(default=None, repr=False)

    def ready(self) -> bool:
        """True once the grammar compiled (the matcher is made here); False while it compiles.

        A failed compile sets error and counts as ready, so the scheduler can fail the request."""
        if self.matcher is not None or self.error is not None:
            return True
        if not self.compiled.done():
            return False
        try:
            self.matcher = self._manager.backend(self.backend).matcher(self.compiled.result())
        except Exception as e:  # a spec that validated but does not compile for this vocabulary
            self.error = f"the {self.spec.kind} constraint could not be compiled: {e}"
        return True

    def fork(self) -> "StructuredOutputRequest":
        """The same constraint from its start, for a sibling sequence (no tokens accepted yet)."""
        return StructuredOutputRequest(self.spec, self.backend, self.compiled, _manager=self._manager)


class StructuredOutputManager:
    def __init__(self, make_backend: Callable[[str], Backend], vocab_size: int, configured_backend: str = "auto",
                 defaults: Optional[dict[str, bool]] = None, max_workers: int = 2, cache_size: int = 256):
        self._make_backend = make_backend
        self.vocab_size = vocab_size
        self.configured_backend = configured_backend
        self.defaults = defaults or {}  # the engine's structured_outputs_config flags
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="freight-grammar")
        self._cache: "OrderedDict[tuple[str, str], Future]" = OrderedDict()
        self._cache_size = cache_size
        self.compile_times: list[float] = []  # seconds, one per compile that ran (not cache hits)

    def backend(self, name: str) -> Backend:
        with self._lock:  # backends are built lazily, on the first request that needs one
            if name not in self._backends:
                start = time.perf_counter()
                self._backends[name] = self._make_backend(name)
                logger.info("structured outputs: %s backend ready in %.2f s", name, time.perf_counter() - start)
            return self._backends[name]

    def request(self, spec: StructuredOutputsParams) -> StructuredOutputRequest:
        """Start compiling (or reuse) spec's grammar; never blocks."""
        spec = with_defaults(spec, self.defaults)
        try:
            name = choose_backend(spec, self.configured_backend)
        except ValueError as e:  # the frontend validated it; a different backend setting could still refuse
            failed: Future = Future()
            failed.set_exception(e)
            return StructuredOutputRequest(spec, "xgrammar", failed, _manager=self)
        key = (name, spec.cache_key())
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
            else:
                fut = self._pool.submit(self._compile, name, spec)
                self._cache[key] = fut
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return StructuredOutputRequest(spec, name, fut, _manager=self)

    def _compile(self, name: str, spec: StructuredOutputsParams) -> Any:
        start = time.perf_counter()
        compiled = self.backend(name).compile(spec)
        elapsed = time.perf_counter() - start
        self.compile_times.append(elapsed)
        logger.debug("compiled a %s grammar with %s in %.1f ms", spec.kind, name, elapsed * 1e3)
        return compiled

    def fill_bitmask(self, grammars: list[StructuredOutputRequest],
                     banned: list[list[int]]) -> np.ndarray:
        """The bitmask rows of these sequences' next tokens (int32 [n, words]).

        banned[i] lists tokens to clear in row i (eos and stop ids under min_tokens) unless that
        would leave no token allowed: then the grammar wins, since nothing else is valid."""
        mask = np.zeros((len(grammars), bitmask_words(self.vocab_size)), dtype=np.int32)
        by_backend: dict[str, list[int]] = {}
        for i, g in enumerate(grammars):
            by_backend.setdefault(g.backend, []).append(i)
        for name, rows in by_backend.items():
            matchers = [grammars[i].matcher for i in rows]
            if len(rows) == len(grammars):
                self.backend(name).fill_bitmask(matchers, mask)
            else:
                part = np.zeros((len(rows), mask.shape[1]), dtype=np.int32)
                self.backend(name).fill_bitmask(matchers, part)
                mask[rows] = part
        for i, toks in enumerate(banned):
            if toks:
                _clear_unless_empty(mask[i], toks)
        return mask

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _clear_unless_empty(row: np.ndarray, tokens: list[int]) -> None:
    kept = row.view(np.uint32).copy()
    for t in tokens:
        if t < 32 * len(kept):
            kept[t >> 5] &= np.uint32(0xFFFFFFFF ^ (1 << (t & 31)))
    if kept.any():
        row[:] = kept.view(np.int32)
