"""Compiles freight's C kernels on first use and loads them with ctypes.

A plain C file (no PyTorch headers) builds in about a second with the system C
compiler, for this machine's CPU (-march=native), into a cache keyed by the source,
the flags and the CPU. Without a compiler, or with FREIGHT_DISABLE_C_KERNELS=1,
callers get None and fall back to their PyTorch implementation.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

_SOURCES = Path(__file__).parent
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _cache_dir() -> Path:
    base = os.environ.get("FREIGHT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "freight")
    return Path(base) / "kernels"


def _torch_lib_dir() -> str:
    # Link against the OpenMP runtime torch already loaded, so both share one thread pool.
    return str(Path(torch.__file__).parent / "lib")


@lru_cache(maxsize=None)
def load(name: str) -> Optional[ctypes.CDLL]:
    if os.environ.get("FREIGHT_DISABLE_C_KERNELS") == "1":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        logger.info("no C compiler found: using the PyTorch fallback for %s", name)
        return None
    src = _SOURCES / f"{name}.c"
    if not src.exists():
        logger.warning("kernel source %s is missing: using the PyTorch fallback", src)
        return None
    flags = [*_FLAGS, f"-L{_torch_lib_dir()}", f"-Wl,-rpath,{_torch_lib_dir()}"]
    key = hashlib.sha256(src.read_bytes() + " ".join([cc, *flags]).encode() + _cpu_signature().encode())
    out = _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    try:
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                tmp_out = Path(tmp) / out.name
                # libmvec (glibc's vector expf) when the C library has it; plain libm otherwise.
                for libs in (["-lmvec", "-lm"], ["-lm"]):
                    proc = subprocess.run([cc, *flags, str(src), "-o", str(tmp_out), *libs],
                                          capture_output=True, text=True)
                    if proc.returncode == 0:
                        break
                if proc.returncode != 0:
                    logger.warning("could not build the %s kernel (using the PyTorch fallback):\n%s",
                                   name, proc.stderr[-2000:])
                    return None
                os.replace(tmp_out, out)  # atomic: concurrent builders never see a partial file
    except OSError as e:  # e.g. a read-only home directory: set FREIGHT_CACHE_DIR
        logger.warning("could not build the %s kernel in %s (using the PyTorch fallback): %s", name, out.parent, e)
        return None
    try:
        return ctypes.CDLL(str(out))
    except OSError as e:
        logger.warning("could not load %s (using the PyTorch fallback): %s", out, e)
        return None


def c_function(name: str, symbol: str, argtypes: list, restype=ctypes.c_int):
    """`symbol` of kernel `name` with its C signature set; None when the kernel is not built here."""
    lib = load(name)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes, fn.restype = argtypes, restype
    return fn
