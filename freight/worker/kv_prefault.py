"""Fault the CPU KV cache's pages in ahead of use, on a low-priority background thread.

The cache is allocated empty so that start-up stays fast, but the first write to each
page then costs a page fault, on the step that happens to need it (in a VM each fault
also goes to the host: 3-5 ms per MB on the 2-core dev VM, so a fresh 256-token prompt
paid ~15 ms of its time to first token, and a W1 run about 1 s). The block pool hands out
blocks in id order until every block has been used once, so the pages are faulted in that
order: block ranges from the lowest ids up, across every layer and head.
MADV_POPULATE_WRITE (Linux 5.14+) maps pages without touching their contents, so it is
safe beside the engine writing the same cache; the thread runs at the lowest priority,
i.e. in the engine's idle time, and only keeps a margin ahead of the highest block in use
(`need`): mapping a whole 4 GiB cache took ~19 s of a core here, and its page zeroing
competes for memory bandwidth with the steps of a server that will never use most of it.

A benchmark has no idle time before its timed run: `map_now(num_blocks)` stops the thread
and maps the blocks it is about to use at once (vLLM zero-fills its whole cache at start-up).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Optional, Sequence

import torch

logger = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23
_CHUNK_BYTES = 2 << 20  # per head region and call: one huge page
_AHEAD_BYTES = 256 << 20  # of K/V (all layers) mapped beyond the highest block in use


def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


class KVCachePrefault:
    """Maps caches' block ranges in id order on a background thread, up to `target`; blocks [0, mapped) are
    done."""

    def __init__(self, madvise, caches: list[torch.Tensor]):
        self._madvise, self._caches = madvise, caches
        self.num_blocks = caches[0].shape[1]
        self._block_bytes = caches[0][0, 0].numel() * caches[0].element_size()  # one head's, one cache
        per_block = self._block_bytes * caches[0].shape[0] * len(caches)  # every head and cache
        self._ahead = max(1, _AHEAD_BYTES // per_block)
        self.mapped = 0
        self.target = min(self.num_blocks, self._ahead)
        self._failed = False
        self._stopped = False
        self._wake = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="freight-kv-prefault", daemon=True)
        self.thread.start()

    def need(self, max_block_id: int) -> None:
        """The engine now uses blocks up to max_block_id: keep the margin ahead of it (cheap when it is)."""
        if max_block_id + self._ahead <= self.target or self.target == self.num_blocks:
            return
        with self._wake:
            self.target = min(self.num_blocks, max(max_block_id + 1 + self._ahead, 2 * self.target))
            self._wake.notify()

    def _map(self, b0: int, b1: int) -> bool:
        """Map blocks [b0, b1) of every cache and head; False if madvise refused (nothing more to do)."""
        page = os.sysconf("SC_PAGE_SIZE")
        for cache in self._caches:
            for h in range(cache.shape[0]):
                start = cache.data_ptr() + (h * self.num_blocks + b0) * self._block_bytes
                end = cache.data_ptr() + (h * self.num_blocks + b1) * self._block_bytes
                start -= start % page  # madvise wants a page-aligned start
                if self._madvise(start, end - start, MADV_POPULATE_WRITE) != 0:
                    logger.debug("KV cache prefault stopped: madvise errno %d", ctypes.get_errno())
                    self._failed = True  # e.g. EINVAL before Linux 5.14: pages fault in on first use
                    return False
        return True

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        except (OSError, AttributeError):
            pass
        step = max(1, _CHUNK_BYTES // self._block_bytes)
        while True:
            with self._wake:
                while self.mapped >= self.target and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    return
                end = min(self.mapped + step, self.target)
            if not self._map(self.mapped, end):
                return
            self.mapped = end
            if end == self.num_blocks:
                return

    def map_now(self, num_blocks: int) -> None:
        """Stop the background thread and map blocks [0, num_blocks) in the calling thread."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self.thread.join()
        end = min(num_blocks, self.num_blocks)
        if self.mapped < end and not self._failed and self._map(self.mapped, end):
            self.mapped = end


def prefault_in_background(caches: Sequence[torch.Tensor]) -> Optional[KVCachePrefault]:
    """caches: CPU tensors laid out [heads, num_blocks, ...]; the started prefault (None: not here)."""
    if os.environ.get("FREIGHT_KV_PREFAULT", "1") == "0" or not caches or caches[0].device.type != "cpu":
        return None
    madvise = _madvise()
    if madvise is None:
        return None
    return KVCachePrefault(madvise, list(caches))
