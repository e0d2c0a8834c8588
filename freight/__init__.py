"""freight: an LLM inference and serving engine with a paged KV cache and continuous batching."""

import os

__version__ = "0.1.0"

# Back PyTorch's large CPU allocations (weights, KV cache) with transparent huge pages: decode
# reads every weight and scattered KV blocks each step, and 4 KiB pages cost a TLB miss per
# page (W1 on bench-135m: 13% faster; paged decode attention over a large cache: 3x). PyTorch
# reads the variable once, at its first allocation, so it is set before torch is imported;
# THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
