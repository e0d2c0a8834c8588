"""freight: an LLM inference and serving engine with a paged KV cache and continuous batching."""

import os

__version__ = "0.1.0"

# Back PyTorch's large CPU allocations (weights, KV cache) with transparent huge pages: decode
# reads every weight and scattered KV blocks each step, and 4 KiB pages cost a TLB miss per
# page (W1 on bench-135m: 13% faster; paged decode attention over a large cache: 3x). PyTorch
# reads the variable once, at its first allocation, so it is set before torch is imported;
# THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _keep_freed_buffers() -> None:
    """Have glibc serve buffers of up to 32 MiB from its heap and keep freed ones for reuse.

    By default a buffer of more than about 128 KiB-32 MiB is mmap()ed and unmapped again on
    free, so a step's activations (a 1,024-row MLP output is 6 MiB) came back as fresh pages
    every layer: each page faulted in and zeroed again (in a VM also through the host). A
    1,024-row SiLU-and-mul took 4 ms that way and 0.5 ms with reused memory. Larger tensors
    (the KV cache, weights) stay mmap()ed. FREIGHT_MALLOC_TUNING=0 leaves malloc alone.
    """
    if os.environ.get("FREIGHT_MALLOC_TUNING", "1") == "0":
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum on 64-bit systems
    mallopt(M_TRIM_THRESHOLD, 512 << 20)


_keep_freed_buffers()

from freight.outputs import CompletionOutput, RequestOutput  # noqa: E402
from freight.sampling_params import SamplingParams  # noqa: E402


def __getattr__(name):
    # LLM pulls in torch and transformers; import it lazily so `import freight`
    # (and the CLI's --help) stays fast.
    if name == "LLM":
        from freight.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'freight' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
