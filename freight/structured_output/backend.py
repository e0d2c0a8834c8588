"""What a grammar backend provides, and how a request's constraint picks one (vLLM's rules).

A backend compiles a StructuredOutputsParams into a grammar for this model's vocabulary
(thread-safe, cached by the manager) and makes per-sequence matchers from it. A matcher
accepts the tokens a sequence samples and fills its row of the token bitmask: bit t of
row r (word t // 32, bit t % 32) is set when token t is allowed next.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from freight.sampling_params import StructuredOutputsParams

BACKENDS = ("auto", "xgrammar", "guidance")


class GrammarSpecError(ValueError):
    """A schema, regex or grammar that the backend cannot compile (an API 400)."""


class Matcher(ABC):
    """One sequence's position in its grammar."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar has accepted a stop token: the sequence is complete."""


class Backend(ABC):
    name: str

    @abstractmethod
    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar (raises GrammarSpecError); called on a worker thread."""

    @abstractmethod
    def matcher(self, compiled: Any) -> Matcher: ...

    @abstractmethod
    def fill_bitmask(self, matchers: list[Matcher], bitmask: np.ndarray) -> None:
        """Fill row i of bitmask (int32 [len(matchers), words]) for matchers[i].

        One row after the other on the calling thread: the libraries' parallel fills leave
        worker pools that compete with the forward's threads for the cores (measured on 2
        cores: a parallel fill of 0.3 s per W1 run cost the forward over 1 s)."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def schema_of(spec: StructuredOutputsParams) -> dict:
    """The JSON schema of a json constraint (as an object), its objects closed.

    An object that does not say otherwise gets "additionalProperties": false: xgrammar's
    strict mode (vLLM's default backend) generates so, and llguidance, which follows the
    letter of JSON schema, would otherwise let a model wander off into keys of its own.
    disable_additional_properties is thus always in effect (an explicit true stays open)."""
    schema = spec.json
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarSpecError(f"structured_outputs.json is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarSpecError("structured_outputs.json must be a JSON schema object.")
    return _close_objects(schema) if isinstance(schema, dict) else schema


def _close_objects(node: Any) -> Any:
    if isinstance(node, list):
        return [_close_objects(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _close_objects(v) for k, v in node.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


# JSON-schema keywords xgrammar does not enforce (it would accept output that breaks them);
# with backend "auto" such schemas go to llguidance, as in vLLM.
_XGRAMMAR_UNENFORCED = {"multipleOf", "uniqueItems", "contains", "minContains", "maxContains", "minProperties",
                        "maxProperties", "propertyNames", "patternProperties", "dependentRequired",
                        "dependentSchemas", "if", "then", "else", "not",
                        # xgrammar 0.2.9 builds a length-bounded string from [^"\\\r\n]: raw control
                        # characters (invalid JSON) are allowed and escapes are not
                        "minLength", "maxLength"}


def xgrammar_unenforced_keywords(schema: Any) -> set[str]:
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found |= _XGRAMMAR_UNENFORCED & set(node)
            if node.get("type") == "string" and "format" in node:
                found.add("format")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def with_defaults(spec: StructuredOutputsParams, defaults: dict[str, bool]) -> StructuredOutputsParams:
    """spec with the engine's default flags turned on (a copy; the caller's object is left alone)."""
    wanted = {k: True for k, v in defaults.items() if v and not getattr(spec, k)}
    return dataclasses.replace(spec, **wanted) if wanted else spec


def choose_backend(spec: StructuredOutputsParams, configured: str = "auto") -> str:
    """The backend that serves spec ("xgrammar" or "guidance"); raises GrammarSpecError if none can.

    "auto" takes xgrammar unless it rejects the constraint (or would not enforce all of it),
    then llguidance, unless the request set disable_fallback."""
    from freight.structured_output import guidance_backend, xgrammar_backend

    checks = {"xgrammar": xgrammar_backend.validate, "guidance": guidance_backend.validate}
    if configured != "auto":
        checks[configured](spec)
        return configured
    try:
        checks["xgrammar"](spec)
        return "xgrammar"
    except GrammarSpecError as first:
        if spec.disable_fallback:
            raise
        try:
            checks["guidance"](spec)
        except GrammarSpecError as second:
            raise GrammarSpecError(f"{str(first).rstrip('.')}. Nor can llguidance serve it: {second}") from None
        return "guidance"
