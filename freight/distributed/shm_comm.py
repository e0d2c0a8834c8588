"""Shared-memory collectives for the tensor-parallel ranks of one host (kernels/shm_comm.c).

One segment, /dev/shm/<name>, holds a header, a sequence counter per rank and two data
slots per rank; a collective is a copy into this rank's slot, a release store of its
counter, a wait for everyone's, and a read of every slot (see shm_comm.c for why two
slots make that the only barrier). Sums go in rank order with fp32 accumulation, so all
ranks get bit-identical results. Every rank must call the same collectives in the same
order with the same sizes (a mismatch is detected and raises on all ranks); one
communicator is for one thread at a time.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from functools import lru_cache
from types import SimpleNamespace
from typing import Optional

import torch

from freight.kernels.build import c_function

_PTR, _I64, _INT, _DBL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SHM_DIR = "/dev/shm"
_NOT_READY = 1
_ERRORS = {-1001: "aborted", -1002: "timed out waiting for rank {peer}",
           -1003: "collective mismatch: rank {peer} called a different collective or size",
           -1004: "invalid arguments", -1005: "the segment's world size or version does not match",
           -1006: "dtype not supported by this build"}  # other negative codes: -errno


@lru_cache(maxsize=None)
def _lib() -> Optional[SimpleNamespace]:
    signatures = {
        "create": ([ctypes.c_char_p, _INT, _I64, _DBL, ctypes.POINTER(_PTR)], _INT),
        "attach": ([ctypes.c_char_p, _INT, _INT, _DBL, ctypes.POINTER(_PTR)], _INT),
        "all_reduce": ([_PTR, _PTR, _I64, _INT], _INT),
        "all_gather": ([_PTR, _PTR, _PTR, _I64, _I64], _INT),
        "abort": ([_PTR], None),
        "close": ([_PTR, _INT], None),
        "error_peer": ([_PTR], _INT),
        "slot_bytes": ([_PTR], _I64),
        "has_f16": ([], _INT),
    }
    fns = {}
    for name, (argtypes, restype) in signatures.items():
        fn = c_function("shm_comm", f"shm_comm_{name}", argtypes, restype)
        if fn is None:
            return None
        fns[name] = fn
    return SimpleNamespace(**fns)


class ShmCommunicator:
    """Sum all-reduce and all-gather between the `world_size` processes of one host, through one
    shared-memory segment."""

    DEFAULT_SLOT_BYTES = 1 << 20  # per rank and parity: 2 * world_size MiB of /dev/shm in all

    def __init__(self, name: str, rank: int, world_size: int, *, slot_bytes: int = DEFAULT_SLOT_BYTES,
                 timeout_s: float = 300.0, connect_timeout_s: float = 60.0):
        """Rank 0 creates /dev/shm/<name> (replacing a stale file of that name); the others wait up
        to connect_timeout_s for it. A collective waiting longer than timeout_s for a peer raises
        (and aborts the segment for everyone)."""
        lib = _lib()
        if lib is None or not os.path.isdir(_SHM_DIR):
            raise RuntimeError("shared-memory collectives unavailable: the shm_comm C kernel does not build here "
                               "or /dev/shm is missing")
        if not name or "/" in name or "\0" in name:
            raise ValueError(f"invalid segment name {name!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.name, self.rank, self.world_size = name, rank, world_size
        self.path = os.path.join(_SHM_DIR, name)
        self._lib, self._h = lib, None
        handle = _PTR()
        path = os.fsencode(self.path)
        if rank == 0:
            rc = lib.create(path, world_size, (int(slot_bytes) + 63) // 64 * 64, timeout_s, ctypes.byref(handle))
        else:
            # Poll from Python, not C: the wait stays interruptible (Ctrl-C) and releases the GIL.
            deadline, nap = time.monotonic() + connect_timeout_s, 0.0005
            while (rc := lib.attach(path, rank, world_size, timeout_s, ctypes.byref(handle))) == _NOT_READY:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank {rank}: shared-memory segment {self.path} not ready after "
                                       f"{connect_timeout_s:.0f} s (has rank 0 created it?)")
                time.sleep(nap)
                nap = min(nap * 2, 0.02)
        if rc != 0:
            reason = _ERRORS[rc] if rc in _ERRORS else os.strerror(-rc)
            raise RuntimeError(f"rank {rank}: cannot open shared-memory segment {self.path}: {reason}")
        self._h = handle.value
        self._all_reduce = lib.all_reduce
        self.slot_bytes = lib.slot_bytes(self._h)
        self._f16 = bool(lib.has_f16())

    @staticmethod
    def available() -> bool:
        """The C kernel builds and loads here, and /dev/shm exists."""
        return os.path.isdir(_SHM_DIR) and _lib() is not None

    def _raise(self, rc: int) -> None:
        peer = self._lib.error_peer(self._h) if self._h is not None else -1
        raise RuntimeError(f"shm communicator {self.name} (rank {self.rank}): "
                           + _ERRORS.get(rc, f"error {rc}").format(peer=peer))

    def _handle(self) -> int:
        if self._h is None:
            raise RuntimeError(f"shm communicator {self.name} is closed")
        return self._h

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place, of a CPU float32/bfloat16/float16 tensor; returns t."""
        # The common case in as few Python operations as possible: at decode sizes this
        # wrapper costs more than the collective itself.
        code = _DTYPES.get(t.dtype)
        if code is None or not t.is_cpu or not t.is_contiguous() or self._h is None or (code == 2 and not self._f16):
            return self._all_reduce_other(t, code)
        n = t.numel()
        if n:
            rc = self._all_reduce(self._h, t.data_ptr(), n, code)
            if rc:
                self._raise(rc)
        return t

    def _all_reduce_other(self, t: torch.Tensor, code: Optional[int]) -> torch.Tensor:
        if code is None or not t.is_cpu:
            raise TypeError(f"shm all_reduce takes CPU float32, bfloat16 or float16 tensors, not {t.dtype} on "
                            f"{t.device}")
        self._handle()
        if code == 2 and not self._f16:  # fp32 accumulation, rounded once: the same result
            acc = t.float()
            return t.copy_(self.all_reduce(acc))
        return t.copy_(self.all_reduce(t.contiguous()))

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """torch.cat([t of rank 0, t of rank 1, ...], dim), as a new tensor (every rank passes the same shape)."""
        if t.device.type != "cpu" or t.dim() == 0:
            raise TypeError("shm all_gather takes CPU tensors of at least one dimension")
        t = t.contiguous()
        d = dim % t.dim()
        shape = list(t.shape)
        shape[d] *= self.world_size
        out = torch.empty(shape, dtype=t.dtype)
        row_bytes = math.prod(t.shape[d:]) * t.element_size()  # rank j's rows go to out[..., j, :]
        if t.numel():
            rc = self._lib.all_gather(self._handle(), t.data_ptr(), out.data_ptr(), t.numel() * t.element_size(),
                                      row_bytes)
            if rc:
                self._raise(rc)
        return out

    def abort(self) -> None:
        """Make every rank waiting in (or later entering) a collective on this segment raise."""
        if self._h is not None:
            self._lib.abort(self._h)

    def close(self) -> None:
        """Unmap; rank 0 also removes the file (other ranks' mappings stay valid). Idempotent."""
        h, self._h = self._h, None
        if h is not None:
            self._lib.close(h, 1 if self.rank == 0 else 0)

    def __enter__(self) -> "ShmCommunicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
