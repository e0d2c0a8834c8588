"""Structured outputs: grammars (xgrammar, llguidance) that constrain what a request may generate.

backend.py: the backend interface and vLLM's backend choice; xgrammar_backend.py and
guidance_backend.py: the two backends; manager.py: compiling off the step loop, a cache
and the per-step bitmask (engine core); freight/worker/bitmask.py applies it to logits.
"""

from freight.structured_output.backend import BACKENDS, GrammarSpecError, choose_backend, with_defaults

__all__ = ["BACKENDS", "GrammarSpecError", "choose_backend", "with_defaults"]
