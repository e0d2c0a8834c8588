"""Compiles freight's C kernels on first use and loads them with ctypes.

A plain C file (no PyTorch headers) builds in about a second with the system C
compiler into a cache keyed by the source, the compiler and the flags. Each file is
built for one ISA level (cpu_features.py: avx512bf16, avx2 or generic), the best this
CPU runs unless FREIGHT_KERNEL_ISA asks for a lower one; inside a file, `#if
defined(__AVX512BF16__)` / `__AVX2__` sections pick the code for that level, so any
kernel file builds at every level with no special case here. Fixed levels rather than
-march=native: a build's behaviour does not depend on which machine compiled it, and
the lower levels can be tested on a bigger CPU. Without a compiler, or with
FREIGHT_DISABLE_C_KERNELS=1, callers get None and fall back to their PyTorch implementation.
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
from typing import Callable, Optional

import torch

from freight.kernels.cpu_features import is_x86, kernel_isa

logger = logging.getLogger(__name__)

_SOURCES = Path(__file__).parent
_FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
# The x86-64-v3 / v4 feature sets (plus AVX512_BF16) spelled out, so compilers older than the
# level names (gcc < 11, clang < 12) build them too; -mtune=generic: no particular core.
_BASE = ["-march=x86-64", "-mtune=generic"]
_V3 = ["-mavx", "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mmovbe", "-msse4.2", "-mpopcnt"]
_ISA_FLAGS = {
    "avx512bf16": [*_BASE, *_V3, "-mavx512f", "-mavx512bw", "-mavx512cd", "-mavx512dq", "-mavx512vl",
                   "-mavx512bf16"],
    "avx2": [*_BASE, *_V3],
    "generic": _BASE,
}


def isa_flags(isa: str) -> list[str]:
    """Compiler flags of an ISA level (off x86 there is one level: the compiler's default target)."""
    return _ISA_FLAGS[isa] if is_x86() else []


def _cache_dir() -> Path:
    base = os.environ.get("FREIGHT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "freight")
    return Path(base) / "kernels"


def _torch_lib_dir() -> str:
    # Link against the OpenMP runtime torch already loaded, so both share one thread pool.
    return str(Path(torch.__file__).parent / "lib")


def load(name: str, isa: Optional[str] = None) -> Optional[ctypes.CDLL]:
    """Kernel `name` built for `isa` (default: kernel_isa()); None when it cannot be built here."""
    if os.environ.get("FREIGHT_DISABLE_C_KERNELS") == "1":
        return None
    return _load(name, isa or kernel_isa())


@lru_cache(maxsize=None)
def _load(name: str, isa: str) -> Optional[ctypes.CDLL]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        logger.info("no C compiler found: using the PyTorch fallback for %s", name)
        return None
    src = _SOURCES / f"{name}.c"
    if not src.exists():
        logger.warning("kernel source %s is missing: using the PyTorch fallback", src)
        return None
    flags = [*_FLAGS, *isa_flags(isa), f"-L{_torch_lib_dir()}", f"-Wl,-rpath,{_torch_lib_dir()}"]
    key = hashlib.sha256(src.read_bytes() + " ".join([cc, *flags]).encode())
    out = _cache_dir() / f"{name}-{isa}-{key.hexdigest()[:16]}.so"
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


def c_function(name: str, symbol: str, argtypes: list, restype=ctypes.c_int, isa: Optional[str] = None):
    """`symbol` of kernel `name` with its C signature set; None when the kernel is not built here."""
    lib = load(name, isa)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes, fn.restype = argtypes, restype
    return fn


_binding_caches: list = []


def kernel_cache(fn: Callable) -> Callable:
    """lru_cache for a binding's symbol lookups, emptied by reset_kernel_caches()."""
    cached = lru_cache(maxsize=None)(fn)
    _binding_caches.append(cached)
    return cached


def reset_kernel_caches() -> None:
    """Forget every looked-up kernel function, so the next calls follow FREIGHT_KERNEL_ISA and
    FREIGHT_DISABLE_C_KERNELS as they are now (tests switch ISA levels within one process)."""
    for cached in _binding_caches:
        cached.cache_clear()
