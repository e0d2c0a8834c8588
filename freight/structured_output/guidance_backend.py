"""The llguidance backend: JSON schema (the fullest coverage), regex, choice, Lark and GBNF grammars."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np

from freight.sampling_params import StructuredOutputsParams
from freight.structured_output.backend import Backend, GrammarSpecError, Matcher, schema_of


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint."""
    kind = spec.kind
    if kind in ("json", "json_object"):
        schema = schema_of(spec) if kind == "json" else {"type": "object"}
        options: dict[str, Any] = {"whitespace_flexible": not spec.disable_any_whitespace}
        if spec.whitespace_pattern is not None:
            options["whitespace_pattern"] = spec.whitespace_pattern
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=options)
    if kind == "regex":
        return llguidance.grammar_from("regex", spec.regex)
    if kind == "choice":
        return llguidance.grammar_from("choice", json.dumps(spec.choice))
    if kind == "grammar":
        return llguidance.grammar_from("grammar", spec.grammar)
    raise GrammarSpecError("llguidance does not support structural_tag; use the xgrammar backend.")


def validate(spec: StructuredOutputsParams) -> None:
    try:
        text = grammar_text(spec)
    except GrammarSpecError:
        raise
    except Exception as e:
        raise GrammarSpecError(f"invalid {spec.kind} for llguidance: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(text)
    if error:
        raise GrammarSpecError(f"invalid {spec.kind} for llguidance: {error.strip()}")


class GuidanceMatcher(Matcher):
    def __init__(self, tokenizer: "llguidance.LLTokenizer", grammar: str):
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)

    def accept_token(self, token_id: int) -> bool:
        return self.matcher.consume_token(token_id) and not self.matcher.is_error()

    def is_terminated(self) -> bool:
        return self.matcher.is_stopped()


class GuidanceBackend(Backend):
    name = "guidance"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=stop_token_ids)

    def compile(self, spec: StructuredOutputsParams) -> Any:
        validate(spec)
        return grammar_text(spec)  # llguidance compiles lazily per matcher; the text is what is cached

    def matcher(self, compiled: Any) -> Matcher:
        m = GuidanceMatcher(self.tokenizer, compiled)
        if m.matcher.is_error():
            raise GrammarSpecError(f"llguidance rejected the grammar: {m.matcher.get_error()}")
        return m

    def fill_bitmask(self, matchers: list[Matcher], bitmask: np.ndarray) -> None:
        for i, m in enumerate(matchers):
            llguidance.numpy.fill_next_token_bitmask(m.matcher, bitmask, i)
