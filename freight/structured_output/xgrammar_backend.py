"""The xgrammar backend (vLLM's default): JSON schema, regex, choice, EBNF and structural tags."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import xgrammar as xgr

from freight.sampling_params import StructuredOutputsParams
from freight.structured_output.backend import (Backend, GrammarSpecError, Matcher, schema_of,
                                               xgrammar_unenforced_keywords)


def choice_ebnf(choice: list[str]) -> str:
    def literal(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'

    return "root ::= " + " | ".join(literal(c) for c in choice)


def _looks_like_lark(grammar: str) -> bool:
    # GBNF/EBNF rules use "::="; Lark uses "name: ...".
    return "::=" not in grammar


def validate(spec: StructuredOutputsParams) -> None:
    """Raise GrammarSpecError unless xgrammar accepts (and would fully enforce) the constraint."""
    kind = spec.kind
    if spec.whitespace_pattern is not None:
        raise GrammarSpecError("xgrammar does not support whitespace_pattern.")
    try:
        if kind == "json":
            schema = schema_of(spec)
            unenforced = xgrammar_unenforced_keywords(schema)
            if unenforced:
                raise GrammarSpecError(f"xgrammar does not enforce the JSON-schema keyword(s) "
                                       f"{', '.join(sorted(unenforced))}.")
            xgr.Grammar.from_json_schema(json.dumps(schema))
        elif kind == "regex":
            xgr.Grammar.from_regex(spec.regex)
        elif kind == "choice":
            xgr.Grammar.from_ebnf(choice_ebnf(spec.choice))
        elif kind == "grammar":
            if _looks_like_lark(spec.grammar):
                xgr.Grammar.from_lark(spec.grammar)
            else:
                xgr.Grammar.from_ebnf(spec.grammar)
        elif kind == "structural_tag":
            xgr.Grammar.from_structural_tag(spec.structural_tag)
    except GrammarSpecError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError (and others) with a parser message
        raise GrammarSpecError(f"invalid {kind} for xgrammar: {_clean(e)}") from None


def _clean(e: Exception) -> str:
    # "[17:33:17] /project/cpp/regex_converter.cc:94: Regex parsing error ..." -> the message
    text = str(e).strip()
    parts = text.split(": ", 1)
    if text.startswith("[") and len(parts) == 2 and ".cc:" in parts[0]:
        text = parts[1]
    return text.splitlines()[0] if text else type(e).__name__


class XGrammarMatcher(Matcher):
    def __init__(self, compiled: "xgr.CompiledGrammar"):
        self.matcher = xgr.GrammarMatcher(compiled)

    def accept_token(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class XGrammarBackend(Backend):
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_threads: int = 1):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        # xgrammar's own cache is off: the manager caches compiled grammars by spec.
        self.compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)

    def compile(self, spec: StructuredOutputsParams) -> Any:
        kind = spec.kind
        try:
            if kind in ("json", "json_object"):  # json_object: any JSON object, as OpenAI defines it
                schema = schema_of(spec) if kind == "json" else {"type": "object"}
                return self.compiler.compile_json_schema(json.dumps(schema),
                                                         any_whitespace=not spec.disable_any_whitespace)
            if kind == "regex":
                return self.compiler.compile_regex(spec.regex)
            if kind == "choice":
                return self.compiler.compile_grammar(choice_ebnf(spec.choice))
            if kind == "grammar":
                grammar = spec.grammar
                if _looks_like_lark(grammar):
                    grammar = xgr.Grammar.from_lark(grammar)
                return self.compiler.compile_grammar(grammar)
            return self.compiler.compile_structural_tag(spec.structural_tag)
        except Exception as e:
            raise GrammarSpecError(f"invalid {kind} for xgrammar: {_clean(e)}") from None

    def matcher(self, compiled: Any) -> Matcher:
        return XGrammarMatcher(compiled)

    def fill_bitmask(self, matchers: list[Matcher], bitmask: np.ndarray) -> None:
        for i, m in enumerate(matchers):
            m.matcher.fill_next_token_bitmask(bitmask, i)
