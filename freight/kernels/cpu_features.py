"""What this CPU computes natively: the ISA level freight's C kernels are built for, and bf16.

The kernels come in three x86 builds (see build.py): `avx512bf16` (x86-64-v4 + AVX512_BF16),
`avx2` (x86-64-v3: AVX2, FMA, F16C) and `generic` (the x86-64 baseline, or the compiler's
default off x86). The best level the CPU's flags allow is used; FREIGHT_KERNEL_ISA names a
lower one, for tests and benchmarks on a big machine or a user who wants the portable build.
It also steers dtype "auto" (has_native_bf16): FREIGHT_KERNEL_ISA=avx2 on an AVX-512 machine
behaves like an AVX2 box end to end, except for oneDNN, which ONEDNN_MAX_CPU_ISA=AVX2 caps.
"""

from __future__ import annotations

import logging
import os
import platform
from functools import lru_cache

logger = logging.getLogger(__name__)

ISA_LEVELS = ("generic", "avx2", "avx512bf16")  # lowest first
ENV_VAR = "FREIGHT_KERNEL_ISA"

# The /proc/cpuinfo flags each level's compiler flags (build.py) assume: x86-64-v3, and v4 plus
# AVX512_BF16 ("abm" is LZCNT).
_V3 = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe", "sse4_2", "popcnt"})
_REQUIRED = {
    "generic": frozenset(),
    "avx2": _V3,
    "avx512bf16": _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_bf16"},
}


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU's feature flags as Linux reports them ("flags" on x86, "Features" on Arm; empty off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def supported_isas() -> tuple[str, ...]:
    """The levels this CPU can run, lowest first."""
    if not is_x86():
        return ("generic",)
    flags = cpu_flags()
    return tuple(level for level in ISA_LEVELS if _REQUIRED[level] <= flags)


def best_isa() -> str:
    return supported_isas()[-1]


_logged: set = set()


def kernel_isa() -> str:
    """The level the kernels are built for: the best supported, or FREIGHT_KERNEL_ISA when lower."""
    best = best_isa()
    asked = os.environ.get(ENV_VAR, "").strip().lower()
    if not asked or asked == best:
        chosen = best
    elif asked not in ISA_LEVELS:
        chosen = best
        _log_once(("unknown", asked), logging.WARNING, "%s=%s is not one of %s: using %s",
                  ENV_VAR, asked, ", ".join(ISA_LEVELS), best)
    elif asked not in supported_isas():
        chosen = best
        _log_once(("unsupported", asked), logging.WARNING, "%s=%s: this CPU cannot run it, using %s",
                  ENV_VAR, asked, best)
    else:
        chosen = asked
    _log_once(("chosen", chosen), logging.INFO, "native CPU kernels: %s build%s", chosen,
              f" ({ENV_VAR}; this CPU supports {best})" if chosen != best else "")
    return chosen


def _log_once(key, level, msg, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, msg, *args)


def has_native_bf16() -> bool:
    """Whether bf16 matmuls run in hardware here (AVX512_BF16 or AMX), as the kernel level sees it.

    Without them oneDNN will not pack bf16 weights and PyTorch emulates bf16 matmuls, several
    times slower than float32. A FREIGHT_KERNEL_ISA below avx512bf16 answers False, so that
    forcing the AVX2 build also exercises what an AVX2 machine would run.
    """
    if not is_x86():
        return "bf16" in cpu_flags()  # Armv8.6 BF16 (BFMMLA), which oneDNN/ACL use
    isa = kernel_isa()
    return isa == "avx512bf16" or (isa == best_isa() and "amx_bf16" in cpu_flags())
