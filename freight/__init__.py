"""freight: an LLM inference and serving engine with a paged KV cache and continuous batching."""

__version__ = "0.1.0"

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
