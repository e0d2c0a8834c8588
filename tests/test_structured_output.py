"""Structured outputs (grammar-constrained decoding) through the offline LLM.

What is checked, and against what:

- Every kind of constraint (JSON schema as an object and as text, json_object, regex,
  choice, EBNF, Lark, xgrammar's structural tag) yields output that an independent
  checker accepts (jsonschema.validate, json.loads, re.fullmatch, membership), greedy
  and sampled over several seeds and with n > 1, on engines configured for xgrammar
  and for llguidance, with finish_reason "stop" when the grammar completes.
- vLLM's backend choice: "auto" sends schemas that xgrammar would not enforce to
  llguidance (and the output obeys the keyword); specs no backend can serve, and bad
  regexes, schemas and grammars, are SamplingParamsErrors at generate() time, before
  anything is queued.
- Batch behaviour: a constrained request never changes the tokens (or logprobs) of an
  unconstrained neighbour; n > 1 and best_of samples each have a matcher of their own;
  preemption (recomputation), chunked prefill and prefix caching give the very tokens a
  roomy, unchunked engine gives.
- Stop strings, min_tokens (the grammar wins where it allows nothing but a stop token),
  logprobs (taken after the grammar mask, as in vLLM: a distribution over the allowed
  tokens only; the allowed sets come from a separate xgrammar matcher built here).
- The vectorised bitmask apply against a per-token loop and xgrammar's own kernel; the
  min_tokens ban on a bitmask row; the compile cache; a slow or failing compile holds up
  or fails only its own request.

The engines run stories260k (shared/models/stories260k, skipped when missing), whose
tiny model loops on JSON whitespace, hence disable_any_whitespace; schemas bound their
strings, numbers and arrays so that outputs complete within max_tokens.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
import time

import jsonschema
import numpy as np
import pytest
import torch

from freight.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams as SO

pytestmark = pytest.mark.timeout(300)

EOS = 2  # stories260k's eos id
WS = {"disable_any_whitespace": True}
PROMPTS = ["Once upon a time", "Lily and Tom", "The little dog", "One day, a big bear", "Tim", "The sun was",
           "A cat named", "Mom said"]

# Strings are bounded by patterns: with minLength/maxLength, "auto" goes to llguidance (xgrammar 0.2.9's
# bounded strings admit raw control characters) and an xgrammar-only engine refuses the schema.
PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "pattern": "^[A-Za-z ,.!']{1,8}$"},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z ,.!']{0,5}$"},
                                  "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
WORD_NUM = r"[a-z]{3,8}-[0-9]{2}"
EBNF = 'root ::= "a" ("b" | "c"){0,6} "d"'
LARK = 'start: item ("," item)~0..2\nitem: NAME "=" NUM\nNAME: /[a-z]{1,5}/\nNUM: /[0-9]{1,3}/'


# =========================================================================== engines

def _new_llm(model_dir, **overrides):
    from conftest import LLM_DEFAULTS, _limit_threads
    from freight import LLM

    kw = dict(LLM_DEFAULTS, kv_cache_memory="16MiB")
    kw.update(overrides)
    llm = LLM(model=str(model_dir), **kw)
    _limit_threads()  # the engine sets torch's thread count to every core; undo that
    return llm


def _core(llm):
    return llm.llm_engine.engine_core


@pytest.fixture(scope="module")
def stories_engines(stories_dir):
    """engine(name) -> a stories260k LLM, made once per module. Names: auto, xgrammar, guidance (backends,
    disable_any_whitespace by default), plain (no structured_outputs_config), tiny_kv (24 KV blocks),
    chunked (16-token prefill chunks, prefix caching), unchunked (neither)."""
    from model_factory import kv_bytes_per_block

    configs = {
        "auto": dict(structured_outputs_config=dict(WS, backend="auto")),
        "xgrammar": dict(structured_outputs_config=dict(WS, backend="xgrammar")),
        "guidance": dict(structured_outputs_config=dict(WS, backend="guidance")),
        "plain": dict(),
        "tiny_kv": dict(structured_outputs_config=WS, kv_cache_memory=24 * kv_bytes_per_block(stories_dir, 16),
                        max_model_len=256),
        "chunked": dict(structured_outputs_config=WS, max_num_batched_tokens=16, enable_chunked_prefill=True,
                        enable_prefix_caching=True),
        "unchunked": dict(structured_outputs_config=WS, enable_chunked_prefill=False, enable_prefix_caching=False),
    }
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = _new_llm(stories_dir, **configs[name])
        return made[name]

    yield get
    for llm in made.values():
        llm.llm_engine.shutdown()


@pytest.fixture(scope="module")
def stories_tokenizer(stories_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(stories_dir))


def gen(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def single_char_ids(tokenizer, chars) -> list[int]:
    """Token ids whose text is exactly one of chars (a plain piece or a byte-fallback token)."""
    return [i for i in range(len(tokenizer)) if tokenizer.decode([i]) in chars]


# =========================================================================== checkers

def check_json(schema):
    def check(text):
        jsonschema.validate(json.loads(text), schema)
    return check


def check_object(text):
    assert isinstance(json.loads(text), dict), text


def check_regex(pattern):
    def check(text):
        assert re.fullmatch(pattern, text), f"{text!r} does not match {pattern!r}"
    return check


def check_choice(choices):
    def check(text):
        assert text in choices, f"{text!r} is not one of {choices}"
    return check


def check_lark(text):
    assert re.fullmatch(r"[a-z]{1,5}=[0-9]{1,3}(,[a-z]{1,5}=[0-9]{1,3}){0,2}", text), text


# kind -> (spec, checker, needs a quote/brace logit bias). json_object has no bounds of its own: a bias
# towards '"' and '}' keeps its strings and objects short enough for the tiny model to close them.
KINDS = {
    "json": (lambda: SO(json=PERSON), check_json(PERSON), False),
    "json_text": (lambda: SO(json=json.dumps(PERSON)), check_json(PERSON), False),
    "json_object": (lambda: SO(json_object=True), check_object, True),
    "regex": (lambda: SO(regex=WORD_NUM), check_regex(WORD_NUM), False),
    "choice": (lambda: SO(choice=["yes", "no", "maybe"]), check_choice(["yes", "no", "maybe"]), False),
    "ebnf": (lambda: SO(grammar=EBNF), check_regex(r"a[bc]{0,6}d"), False),
    "lark": (lambda: SO(grammar=LARK), check_lark, False),
}


def kind_params(kind, tokenizer, **kw):
    spec, _, biased = KINDS[kind]
    if biased:
        kw["logit_bias"] = {**{i: 8.0 for i in single_char_ids(tokenizer, ['"'])},
                            **{i: 20.0 for i in single_char_ids(tokenizer, ["}"])}}
    return SamplingParams(structured_outputs=spec(), max_tokens=kw.pop("max_tokens", 80), **kw)


def assert_completed(out, checker, what=""):
    """A sequence the grammar completed: finish_reason stop (no stop string) and valid text."""
    assert out.finish_reason == "stop", f"{what}: finish_reason {out.finish_reason!r}, text {out.text!r}"
    assert out.stop_reason is None, f"{what}: stop_reason {out.stop_reason!r}"
    try:
        checker(out.text)
    except Exception as e:
        raise AssertionError(f"{what}: invalid output {out.text!r} (tokens {out.token_ids}): {e}") from None


def assert_text_is_its_tokens(llm, out, what=""):
    """Each sample's text is its tokens' text (a final eos adds none): no token's text goes missing."""
    tok = llm.get_tokenizer()
    head = tok.decode(out.prompt_token_ids, skip_special_tokens=True)
    for i, c in enumerate(out.outputs):
        ids = c.token_ids[:-1] if c.token_ids[-1:] == [EOS] else c.token_ids
        full = tok.decode(list(out.prompt_token_ids) + list(ids), skip_special_tokens=True)
        assert full.startswith(head) and full[len(head):] == c.text, (
            f"{what} sample {i}: text {c.text!r}, but its tokens {c.token_ids} spell {full[len(head):]!r}")


def check_request(llm, out, checker, what=""):
    """Every sample of a request completed its grammar, with valid text that is its tokens' text."""
    for i, c in enumerate(out.outputs):
        assert_completed(c, checker, f"{what} sample {i}")
    assert_text_is_its_tokens(llm, out, what)


# =========================================================================== 1. every kind, both backends

BACKENDS = ["xgrammar", "guidance"]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_kind_greedy_valid(stories_engines, stories_tokenizer, backend, kind):
    llm = stories_engines(backend)
    outs = gen(llm, PROMPTS[:3], kind_params(kind, stories_tokenizer, temperature=0.0))
    for p, o in zip(PROMPTS, outs):
        check_request(llm, o, KINDS[kind][1], f"{backend} {kind} greedy after {p!r}")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_kind_sampled_valid(stories_engines, stories_tokenizer, backend, kind):
    """Temperature 0.8-1.0 over seeds, n=1 and n=3, all in one batch."""
    llm = stories_engines(backend)
    params = [kind_params(kind, stories_tokenizer, temperature=t, seed=s, n=n)
              for t, s, n in [(1.0, 0, 1), (0.9, 1, 1), (0.8, 2, 1), (1.0, 3, 3)]]
    outs = gen(llm, PROMPTS[:4], params)
    for o, sp in zip(outs, params):
        assert len(o.outputs) == sp.n
        check_request(llm, o, KINDS[kind][1], f"{backend} {kind} seed {sp.seed}")


def test_structural_tag_xgrammar(stories_engines):
    tag = {"type": "structural_tag",
           "format": {"type": "tag", "begin": "<n>", "end": "</n>",
                      "content": {"type": "json_schema", "json_schema": {"type": "integer", "minimum": 0,
                                                                         "maximum": 99}}}}
    llm = stories_engines("auto")
    params = [SamplingParams(temperature=t, seed=s, max_tokens=20,
                             structured_outputs=SO(structural_tag=json.dumps(tag)))
              for t, s in [(0.0, None), (1.0, 0), (1.0, 1)]]
    for o in gen(llm, PROMPTS[:3], params):
        check_request(llm, o, check_regex(r"<n>(0|[1-9][0-9]?)</n>"), "structural tag")
    with pytest.raises(SamplingParamsError, match="structural_tag"):
        gen(stories_engines("guidance"), PROMPTS[0], params[0])


def test_xgrammar_completion_ends_with_eos(stories_engines):
    """xgrammar terminates on the stop token: it is the last token id and adds no text."""
    llm = stories_engines("xgrammar")
    o = gen(llm, PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, structured_outputs=SO(choice=["yes", "no"])))
    c = o[0].outputs[0]
    assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1], c.token_ids
    assert c.text in ("yes", "no")


# =========================================================================== 2. backend choice and errors

MULTIPLE_OF = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 200,
                                                      "multipleOf": 7}},
               "required": ["n"], "additionalProperties": False}
DATE_FORMAT = {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"],
               "additionalProperties": False}


def check_json_formats(schema):
    def check(text):
        jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())
    return check


BOUNDED_STRING = {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 6}},
                  "required": ["s"], "additionalProperties": False}


@pytest.mark.parametrize("schema", [MULTIPLE_OF, DATE_FORMAT, BOUNDED_STRING],
                         ids=["multipleOf", "format", "maxLength"])
def test_auto_falls_back_to_llguidance(stories_engines, schema):
    from freight.structured_output import choose_backend

    spec = SO(json=schema, **WS)
    assert choose_backend(spec, "auto") == "guidance"
    llm = stories_engines("auto")
    params = [SamplingParams(temperature=t, seed=s, max_tokens=40, structured_outputs=SO(json=schema))
              for t, s in [(0.0, None), (1.0, 0), (1.0, 1), (1.0, 2)]]
    outs = gen(llm, PROMPTS[:4], params)
    for o in outs:
        assert_completed(o.outputs[0], check_json_formats(schema), "auto -> llguidance")
    cached = {name for name, key in _core(llm)._structured._cache if key == spec.cache_key()}
    assert cached == {"guidance"}, f"the schema compiled with {cached}"


def test_mixed_backends_in_one_batch(stories_engines):
    """auto: one batch with xgrammar and llguidance rows (the bitmask is filled per backend)."""
    llm = stories_engines("auto")
    params = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=SO(json=MULTIPLE_OF)),
              SamplingParams(temperature=0, max_tokens=40, structured_outputs=SO(regex=WORD_NUM)),
              SamplingParams(temperature=0, max_tokens=40),
              SamplingParams(temperature=1.0, seed=5, max_tokens=40, structured_outputs=SO(json=DATE_FORMAT)),
              SamplingParams(temperature=1.0, seed=6, max_tokens=80, structured_outputs=SO(json=PERSON))]
    outs = gen(llm, PROMPTS[:5], params)
    assert_completed(outs[0].outputs[0], check_json(MULTIPLE_OF), "llguidance row")
    assert_completed(outs[1].outputs[0], check_regex(WORD_NUM), "xgrammar row")
    assert outs[2].outputs[0].token_ids == gen(llm, PROMPTS[2], params[2])[0].outputs[0].token_ids
    assert_completed(outs[3].outputs[0], check_json_formats(DATE_FORMAT), "llguidance row")
    assert_completed(outs[4].outputs[0], check_json(PERSON), "xgrammar row")


def _assert_rejected_before_queueing(llm, params, match):
    """generate([good, bad]) raises SamplingParamsError and leaves nothing queued or compiled."""
    core = _core(llm)
    compiled = len(core._structured.compile_times) if core._structured is not None else 0
    good = SamplingParams(temperature=0, max_tokens=4, structured_outputs=SO(regex="[0-9]{3}"))
    with pytest.raises(SamplingParamsError, match=match) as info:
        gen(llm, PROMPTS[:2], [good, params])
    assert info.value.param == "structured_outputs"
    assert not llm.llm_engine.has_unfinished_requests()
    assert not core.has_unfinished_requests()
    now = len(core._structured.compile_times) if core._structured is not None else 0
    assert now == compiled, "a request was compiled although its batch was refused"
    return str(info.value)


def test_schema_no_backend_supports_raises(stories_engines):
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 3}
    msg = _assert_rejected_before_queueing(stories_engines("auto"), SamplingParams(
        structured_outputs=SO(json=schema)), "uniqueItems")
    assert "xgrammar" in msg and "llguidance" in msg, msg


INVALID = {
    "regex": (lambda: SO(regex="(ab"), r"regex|parenthes|unclosed"),
    "json_text": (lambda: SO(json="{not json"), "not valid JSON"),
    "json_not_object": (lambda: SO(json="[1, 2]"), "JSON schema object"),
    "json_bad_type": (lambda: SO(json={"type": "frobnicate"}), "frobnicate"),
    "ebnf_undefined_rule": (lambda: SO(grammar="root ::= foo"), "foo"),
    "lark_undefined_rule": (lambda: SO(grammar="start: foo"), "foo"),
}


@pytest.mark.parametrize("case", list(INVALID))
@pytest.mark.parametrize("backend", ["auto", "xgrammar", "guidance"])
def test_invalid_spec_raises(stories_engines, backend, case):
    spec, match = INVALID[case]
    _assert_rejected_before_queueing(stories_engines(backend), SamplingParams(structured_outputs=spec()), match)


def test_disable_fallback_keeps_xgrammar_error(stories_engines):
    llm = stories_engines("auto")
    msg = _assert_rejected_before_queueing(
        llm, SamplingParams(structured_outputs=SO(json=MULTIPLE_OF, disable_fallback=True)), "multipleOf")
    assert "xgrammar" in msg and "llguidance" not in msg, msg
    # The same schema without the flag is served (by llguidance).
    o = gen(llm, PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, structured_outputs=SO(json=MULTIPLE_OF)))
    assert_completed(o[0].outputs[0], check_json(MULTIPLE_OF), "fallback")


def test_configured_backend_never_falls_back(stories_engines):
    _assert_rejected_before_queueing(stories_engines("xgrammar"),
                                     SamplingParams(structured_outputs=SO(json=MULTIPLE_OF)), "multipleOf")
    _assert_rejected_before_queueing(stories_engines("xgrammar"),
                                     SamplingParams(structured_outputs=SO(json={"type": "object"},
                                                                          whitespace_pattern="[ ]?")),
                                     "whitespace_pattern")
    _assert_rejected_before_queueing(stories_engines("guidance"),
                                     SamplingParams(structured_outputs=SO(structural_tag='{"type": "x"}')),
                                     "structural_tag")


@pytest.mark.parametrize("fields", [
    dict(json={"type": "object"}, regex="a"),
    dict(regex="a", choice=["a"]),
    dict(grammar="root ::= \"a\"", json_object=True),
    dict(),
    dict(choice=[]),
    dict(choice=["a", 1]),
    dict(json_object=False),
    dict(grammar="   "),
    dict(regex=5),
    dict(regex="a", disable_fallback="yes"),
], ids=["json+regex", "regex+choice", "grammar+json_object", "none", "empty-choice", "non-string-choice",
        "json_object-false", "blank-grammar", "regex-not-str", "flag-not-bool"])
def test_malformed_structured_outputs_params(fields):
    with pytest.raises(SamplingParamsError) as info:
        SO(**fields)
    assert info.value.param == "structured_outputs"
    with pytest.raises(SamplingParamsError):
        SamplingParams(structured_outputs=dict(fields))


def test_structured_outputs_dict_and_unknown_field():
    sp = SamplingParams(structured_outputs={"regex": "[a-z]+", "disable_fallback": True})
    assert isinstance(sp.structured_outputs, SO) and sp.structured_outputs.kind == "regex"
    with pytest.raises(SamplingParamsError, match="regexp"):
        SamplingParams(structured_outputs={"regexp": "[a-z]+"})
    with pytest.raises(SamplingParamsError):
        SamplingParams(structured_outputs="[a-z]+")


# =========================================================================== 3. isolation of neighbours

def test_constrained_neighbours_do_not_change_unconstrained_requests(stories_engines):
    llm = stories_engines("auto")
    unconstrained = [
        (PROMPTS[0], SamplingParams(temperature=0, max_tokens=24)),
        (PROMPTS[1], SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=24, logprobs=3)),
        # min_tokens with a strong eos bias: eos comes exactly at token 13. Constrained rows' min_tokens
        # bans move into their bitmasks; this row must keep its own.
        (PROMPTS[2], SamplingParams(temperature=0, max_tokens=20, min_tokens=12, logit_bias={EOS: 30.0})),
    ]
    constrained = [
        (PROMPTS[3], SamplingParams(temperature=0, max_tokens=80, structured_outputs=SO(json=PERSON))),
        (PROMPTS[4], SamplingParams(temperature=1.0, seed=3, max_tokens=30, min_tokens=4,
                                    structured_outputs=SO(regex=WORD_NUM))),
        (PROMPTS[5], SamplingParams(temperature=0, max_tokens=10, logprobs=2, min_tokens=6,
                                    structured_outputs=SO(choice=["yes", "no"]))),
    ]
    alone = gen(llm, [p for p, _ in unconstrained], [sp for _, sp in unconstrained])
    assert alone[2].outputs[0].token_ids[-1] == EOS and len(alone[2].outputs[0].token_ids) == 13
    order = [constrained[0], unconstrained[0], constrained[1], unconstrained[2], constrained[2], unconstrained[1]]
    mixed = gen(llm, [p for p, _ in order], [sp for _, sp in order])
    by_prompt = {o.prompt: o.outputs[0] for o in mixed}
    for (p, _), a in zip(unconstrained, alone):
        m = by_prompt[p]
        assert m.token_ids == a.outputs[0].token_ids, f"{p!r}: alone {a.outputs[0].token_ids}, batched {m.token_ids}"
        assert m.text == a.outputs[0].text and m.finish_reason == a.outputs[0].finish_reason
        if a.outputs[0].logprobs is not None:
            for x, y in zip(a.outputs[0].logprobs, m.logprobs):
                assert x.keys() == y.keys()
                assert all(math.isclose(x[k], y[k], rel_tol=1e-5, abs_tol=1e-5) for k in x)
    assert_completed(by_prompt[PROMPTS[3]], check_json(PERSON), "json neighbour")
    assert_completed(by_prompt[PROMPTS[4]], check_regex(WORD_NUM), "regex neighbour")
    assert_completed(by_prompt[PROMPTS[5]], check_choice(["yes", "no"]), "choice neighbour")


# =========================================================================== 4. n > 1 and best_of

def test_greedy_n_samples_each_have_a_matcher(stories_engines):
    """n=3 greedy: three identical valid outputs. Had the samples shared a matcher, the second sample's
    first token would be fed to a matcher already past it (an error, or invalid text)."""
    llm = stories_engines("auto")
    for spec, checker in [(SO(json=PERSON), check_json(PERSON)), (SO(regex=WORD_NUM), check_regex(WORD_NUM))]:
        o = gen(llm, PROMPTS[0], SamplingParams(n=3, temperature=0, max_tokens=80, structured_outputs=spec))[0]
        assert len(o.outputs) == 3
        for c in o.outputs:
            assert_completed(c, checker, f"greedy n=3 {spec.kind}")
        assert len({tuple(c.token_ids) for c in o.outputs}) == 1


def test_sampled_n_differ_and_validate(stories_engines):
    llm = stories_engines("auto")
    o = gen(llm, PROMPTS[1], SamplingParams(n=6, temperature=1.0, seed=42, max_tokens=30,
                                            structured_outputs=SO(regex=WORD_NUM)))[0]
    for c in o.outputs:
        assert_completed(c, check_regex(WORD_NUM), "n=6")
    assert len({c.text for c in o.outputs}) > 1, [c.text for c in o.outputs]
    # Seeded: the same request again gives the same samples.
    again = gen(llm, PROMPTS[1], SamplingParams(n=6, temperature=1.0, seed=42, max_tokens=30,
                                                structured_outputs=SO(regex=WORD_NUM)))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in o.outputs]


def test_best_of_returns_best_valid_samples(stories_engines):
    llm = stories_engines("auto")
    o = gen(llm, PROMPTS[2], SamplingParams(n=2, best_of=5, temperature=1.0, seed=7, max_tokens=80,
                                            structured_outputs=SO(json=PERSON)))[0]
    assert len(o.outputs) == 2
    for c in o.outputs:
        assert_completed(c, check_json(PERSON), "best_of")
    cum = [c.cumulative_logprob for c in o.outputs]
    assert all(math.isfinite(x) for x in cum) and cum[0] >= cum[1], cum
    # best_of keeps the best of all five: none of n=5's samples (same seeds) beats the returned ones.
    all5 = gen(llm, PROMPTS[2], SamplingParams(n=5, temperature=1.0, seed=7, max_tokens=80,
                                               structured_outputs=SO(json=PERSON)))[0]
    best = sorted((c.cumulative_logprob for c in all5.outputs), reverse=True)[:2]
    assert cum == pytest.approx(best, abs=1e-4)


# =========================================================================== 5. preemption

def test_preemption_recompute_keeps_grammar_state(stories_engines):
    """24 KV blocks of 16 tokens for 8 requests of ~25 prompt + ~60 output tokens: requests are preempted,
    recomputed, and their matchers (which already accepted their tokens) carry on."""
    tiny, roomy = stories_engines("tiny_kv"), stories_engines("auto")
    prompts = [f"{p}, {p.lower()} and {p.lower()} again." for p in PROMPTS]
    params = [SamplingParams(temperature=0, max_tokens=80, structured_outputs=SO(json=PERSON)) for _ in prompts[:6]]
    params += [SamplingParams(temperature=1.0, seed=s, max_tokens=30, structured_outputs=SO(regex=WORD_NUM))
               for s in (1, 2)]
    before = tiny.llm_engine.get_stats().num_preemptions
    small = gen(tiny, prompts, params)
    stats = tiny.llm_engine.get_stats()
    assert stats.num_preemptions > before, f"no preemption with {stats.num_total_blocks} blocks"
    assert stats.num_free_blocks == stats.num_total_blocks
    big = gen(roomy, prompts, params)
    for i, (s, b) in enumerate(zip(small, big)):
        checker = check_json(PERSON) if i < 6 else check_regex(WORD_NUM)
        assert_completed(s.outputs[0], checker, f"preempted engine, request {i}")
        assert s.outputs[0].token_ids == b.outputs[0].token_ids, f"request {i} differs from the roomy engine"


# =========================================================================== 6. chunked prefill, prefix caching

def test_chunked_prefill_and_prefix_caching(stories_engines, stories_tokenizer):
    shared = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
              "with her friends. One day, she saw a big red ball under a tree. ")
    assert len(stories_tokenizer(shared).input_ids) > 40  # several 16-token chunks and full cache blocks
    prompts = [shared + s for s in ("She said", "Tom asked", "The ball", "Her mom")]
    params = [SamplingParams(temperature=0, max_tokens=80, structured_outputs=SO(json=PERSON)),
              SamplingParams(temperature=0, max_tokens=30, structured_outputs=SO(regex=WORD_NUM)),
              SamplingParams(temperature=0.9, seed=4, max_tokens=80, structured_outputs=SO(json=PERSON)),
              SamplingParams(temperature=0, max_tokens=40, structured_outputs=SO(grammar=LARK))]
    checkers = [check_json(PERSON), check_regex(WORD_NUM), check_json(PERSON), check_lark]
    chunked, plain = stories_engines("chunked"), stories_engines("unchunked")
    steps0 = chunked.llm_engine.get_stats().num_steps
    gen(chunked, prompts[0], SamplingParams(max_tokens=1))  # warms the prefix cache
    got = gen(chunked, prompts, params)
    assert sum(o.num_cached_tokens for o in got) >= 32 * len(prompts), [o.num_cached_tokens for o in got]
    assert chunked.llm_engine.get_stats().num_steps - steps0 > 1 + len(stories_tokenizer(prompts[0]).input_ids) // 16
    want = gen(plain, prompts, params)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_completed(g.outputs[0], checkers[i], f"chunked request {i}")
        assert g.outputs[0].token_ids == w.outputs[0].token_ids, f"request {i}: chunked/cached differs"
    # A cold cache: the first prompt's whole prefill goes in 16-token chunks (later ones may reuse its blocks).
    chunked.llm_engine.reset_prefix_cache()
    again = gen(chunked, prompts, params)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in want]


# =========================================================================== 7. stop strings

@pytest.mark.parametrize("include", [False, True])
def test_stop_string_with_constraint(stories_engines, include):
    llm = stories_engines("auto")
    spec = SO(regex=WORD_NUM)
    full = gen(llm, PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, structured_outputs=spec))[0].outputs[0]
    assert "-" in full.text
    o = gen(llm, PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, structured_outputs=spec, stop="-",
                                            include_stop_str_in_output=include))[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == "-"
    head = full.text.split("-")[0]
    assert o.text == (head + "-" if include else head)
    assert re.fullmatch(r"[a-z]{3,8}", head)
    # A stop string inside JSON: the text is the valid output cut before it.
    full = gen(llm, PROMPTS[1], SamplingParams(temperature=0, max_tokens=80,
                                               structured_outputs=SO(json=PERSON)))[0].outputs[0]
    o = gen(llm, PROMPTS[1], SamplingParams(temperature=0, max_tokens=80, stop='"age"', structured_outputs=SO(
        json=PERSON), include_stop_str_in_output=include))[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == '"age"'
    cut = full.text.index('"age"') + (len('"age"') if include else 0)
    assert o.text == full.text[:cut]


def test_stop_token_ids_with_constraint(stories_engines, stories_tokenizer):
    """A stop token the grammar allows ends the sequence there (finish stop, stop_reason the id, no text)."""
    llm = stories_engines("auto")
    dash = single_char_ids(stories_tokenizer, ["-"])
    assert dash
    full = gen(llm, PROMPTS[3], SamplingParams(temperature=0, max_tokens=30,
                                               structured_outputs=SO(regex=WORD_NUM)))[0].outputs[0]
    o = gen(llm, PROMPTS[3], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=dash,
                                            structured_outputs=SO(regex=WORD_NUM)))[0].outputs[0]
    cut = next(i for i, t in enumerate(full.token_ids) if t in dash)
    assert o.token_ids == full.token_ids[:cut + 1]
    assert o.finish_reason == "stop" and o.stop_reason == full.token_ids[cut]
    assert o.text == full.text.split("-")[0] and re.fullmatch("[a-z]{3,8}", o.text)


# =========================================================================== 8. min_tokens

@pytest.mark.parametrize("backend", BACKENDS)
def test_min_tokens_grammar_wins_when_only_eos_is_left(stories_engines, backend):
    """choice ["yes", "no"] is done after a few tokens; min_tokens=10 then bans the only token left (eos):
    the grammar wins and the request stops with a valid choice, well before 10 tokens."""
    llm = stories_engines(backend)
    plain = gen(llm, PROMPTS[0], SamplingParams(temperature=0, max_tokens=20,
                                                structured_outputs=SO(choice=["yes", "no"])))[0].outputs[0]
    params = [SamplingParams(temperature=t, seed=s, max_tokens=20, min_tokens=10,
                             structured_outputs=SO(choice=["yes", "no"])) for t, s in [(0, None), (1.0, 1)]]
    for o in gen(llm, [PROMPTS[0], PROMPTS[1]], params):
        check_request(llm, o, check_choice(["yes", "no"]), f"{backend} min_tokens choice")
        assert len(o.outputs[0].token_ids) < 10
    assert gen(llm, PROMPTS[0], params[0])[0].outputs[0].token_ids == plain.token_ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("min_tokens", [0, 5, 9])
def test_min_tokens_regex(stories_engines, backend, min_tokens):
    """[a-z]{1,80} allows eos after any letter; with eos strongly favoured the output ends as soon as
    min_tokens allows: eos exactly at index max(min_tokens, 1) (the grammar needs one letter)."""
    llm = stories_engines(backend)
    sp = SamplingParams(temperature=0, max_tokens=30, min_tokens=min_tokens, logit_bias={EOS: 50.0},
                        structured_outputs=SO(regex="[a-z]{1,80}"))
    out = gen(llm, PROMPTS[2], sp)[0]
    check_request(llm, out, check_regex("[a-z]{1,80}"), f"{backend} min_tokens={min_tokens}")
    c = out.outputs[0]
    assert EOS in c.token_ids and c.token_ids.index(EOS) == max(min_tokens, 1), c.token_ids


# =========================================================================== 9. logprobs

def _reference_allowed(backend: str, tokenizer, vocab_size: int, grammar_ebnf: str):
    """A matcher of the backend's library, made here, for grammar_ebnf: allowed(tokens so far) -> allowed ids.

    (The libraries differ on purpose: llguidance refuses a byte-fallback token where a normal token spells
    the same text, xgrammar allows both.)"""
    if backend == "xgrammar":
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[EOS])
        compiled = xgr.GrammarCompiler(info, cache_enabled=False).compile_grammar(grammar_ebnf)

        def mask_after(prefix):
            m = xgr.GrammarMatcher(compiled)
            for t in prefix:
                assert m.accept_token(t)
            mask = xgr.allocate_token_bitmask(1, vocab_size)
            m.fill_next_token_bitmask(mask)
            return mask.numpy()
    else:
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=EOS)
        grammar = llguidance.grammar_from("grammar", grammar_ebnf)

        def mask_after(prefix):
            m = llguidance.LLMatcher(lltok, grammar)
            for t in prefix:
                assert m.consume_token(t)
            mask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
            llguidance.numpy.fill_next_token_bitmask(m, mask, 0)
            return mask

    def allowed(prefix: list[int]) -> set[int]:
        bits = np.unpackbits(np.ascontiguousarray(mask_after(prefix)).view(np.uint8), bitorder="little")
        return set(np.nonzero(bits[:vocab_size])[0].tolist())

    return allowed


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_are_over_allowed_tokens(stories_engines, stories_tokenizer, backend):
    """logprobs are taken after the grammar mask (vLLM's order): at every position the finite entries are
    exactly the tokens the grammar allows there, and their probabilities sum to 1."""
    llm = stories_engines(backend)
    vocab = llm.llm_engine.model_config.vocab_size
    allowed = _reference_allowed(backend, stories_tokenizer, vocab, 'root ::= "yes" | "no" | "maybe"')
    params = [SamplingParams(temperature=t, seed=s, max_tokens=12, logprobs=20,
                             structured_outputs=SO(choice=["yes", "no", "maybe"]))
              for t, s in [(0, None), (1.0, 0), (1.0, 1), (1.0, 2)]]
    unconstrained = gen(llm, PROMPTS[0], SamplingParams(temperature=0, max_tokens=1, logprobs=20))[0].outputs[0]
    for o in gen(llm, [PROMPTS[0]] * len(params), params):
        c = o.outputs[0]
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        for pos, (tok, lps) in enumerate(zip(c.token_ids, c.logprobs)):
            ok = allowed(c.token_ids[:pos])
            assert tok in ok and math.isfinite(lps[tok]) and lps[tok] <= 0.0
            finite = {t for t, lp in lps.items() if math.isfinite(lp)}
            assert finite <= ok, f"position {pos}: logprobs for tokens the grammar forbids: {finite - ok}"
            if len(ok) < 20:  # every allowed token is in the top 20
                assert finite == ok, f"position {pos}: allowed {ok}, finite logprobs for {finite}"
                total = sum(math.exp(lp) for lp in lps.values() if math.isfinite(lp))
                assert total == pytest.approx(1.0, abs=1e-4), f"position {pos}: probabilities sum to {total}"
            if len(ok) == 1:
                assert lps[tok] == pytest.approx(0.0, abs=1e-6)
        assert c.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(c.token_ids, c.logprobs)),
                                                     abs=1e-4)
    # Those sums of 1 are a renormalisation: unconstrained, the first position puts real mass on forbidden tokens.
    raw = unconstrained.logprobs[0]
    forbidden_mass = sum(math.exp(lp) for t, lp in raw.items() if t not in allowed([]))
    assert forbidden_mass > 0.01, f"precondition: the raw top 20 has only {forbidden_mass} outside the grammar"


def test_prompt_logprobs_unaffected_by_constraint(stories_engines):
    """The grammar masks the sampling rows only: prompt logprobs are those of an unconstrained request."""
    llm = stories_engines("auto")
    prompt = "Once upon a time, there was a little girl named Lily."
    con, plain = gen(llm, [prompt, prompt], [
        SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=3, structured_outputs=SO(choice=["yes", "no"])),
        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)])
    assert con.prompt_logprobs is not None and len(con.prompt_logprobs) == len(con.prompt_token_ids)
    assert con.prompt_logprobs[0] is None and plain.prompt_logprobs[0] is None
    for pos, (a, b) in enumerate(zip(con.prompt_logprobs[1:], plain.prompt_logprobs[1:]), start=1):
        assert a.keys() == b.keys(), f"prompt position {pos}"
        assert all(math.isfinite(a[t]) and a[t] == pytest.approx(b[t], abs=1e-5) for t in a)
    assert con.outputs[0].text in ("yes", "no")


# =========================================================================== 10. bitmask units

def _random_bitmask(rng, rows: int, vocab: int, density: float) -> np.ndarray:
    words = (vocab + 31) // 32
    bits = rng.random((rows, words * 32)) < density
    return np.packbits(bits, axis=1, bitorder="little").view(np.int32).reshape(rows, words)


def _naive_apply(logits: torch.Tensor, bitmask: np.ndarray, rows: list[int]) -> torch.Tensor:
    out = logits.clone()
    words = bitmask.astype(np.int64) & 0xFFFFFFFF
    for i, r in enumerate(rows):
        for t in range(logits.shape[1]):
            if not (int(words[i, t // 32]) >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


ROW_SETS = {"all": lambda n: list(range(n)), "prefix": lambda n: [0, 1], "gaps": lambda n: [1, 3, 4],
            "unordered": lambda n: [4, 0, 2], "one": lambda n: [3], "none": lambda n: []}


@pytest.fixture(params=["c_kernel", "torch"])
def bitmask_path(request, monkeypatch):
    """Both ways of applying a bitmask: the C kernel (skipped without a compiler) and the PyTorch fallback."""
    import freight.worker.bitmask as wb
    from freight.kernels.build import load

    if request.param == "torch":
        monkeypatch.setattr(wb, "apply_bitmask", lambda *args: False)
    elif load("bitmask") is None:
        pytest.skip("the bitmask C kernel cannot be built here (no compiler, or FREIGHT_DISABLE_C_KERNELS=1)")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 513, 1000])
@pytest.mark.parametrize("rows", list(ROW_SETS))
def test_apply_token_bitmask_matches_naive_loop(vocab, rows, dtype, bitmask_path):
    from freight.worker.bitmask import apply_token_bitmask

    rng = np.random.default_rng(vocab * 7 + len(rows))
    n = 5
    row_ids = ROW_SETS[rows](n)
    logits = torch.from_numpy(rng.standard_normal((n + 2, vocab)).astype(np.float32)).to(dtype)  # 2 rows past n
    mask = _random_bitmask(rng, len(row_ids), vocab, density=0.5)
    if len(row_ids) > 1:  # an all-allowed and an all-forbidden row
        mask[0] = -1
        mask[-1] = 0
    want = _naive_apply(logits, mask, row_ids)
    got = logits.clone()
    apply_token_bitmask(got, mask, row_ids)
    assert torch.equal(got, want)
    untouched = [r for r in range(n + 2) if r not in row_ids]
    assert torch.equal(got[untouched], logits[untouched])


@pytest.mark.parametrize("vocab", [50, 512, 32000 + 7])
def test_apply_token_bitmask_matches_xgrammar(vocab, bitmask_path):
    import xgrammar as xgr

    from freight.worker.bitmask import apply_token_bitmask, unpack_bitmask

    rng = np.random.default_rng(vocab)
    n = 6
    logits = torch.from_numpy(rng.standard_normal((n, vocab)).astype(np.float32))
    for row_ids in ([0, 1, 2, 3, 4, 5], [5, 2], [1, 2, 3]):
        mask = _random_bitmask(rng, len(row_ids), vocab, density=0.3)
        got = logits.clone()
        apply_token_bitmask(got, mask, row_ids)
        full = np.full((n, mask.shape[1]), -1, dtype=np.int32)  # xgrammar: mask row r applies to logits row r
        full[row_ids] = mask
        want = logits.clone()
        xgr.apply_token_bitmask_inplace(want, torch.from_numpy(full), vocab_size=vocab, indices=row_ids)
        assert torch.equal(got, want), f"rows {row_ids}"
        allowed = unpack_bitmask(mask, vocab)
        assert allowed.shape == (len(row_ids), vocab) and allowed.dtype == torch.bool
        assert torch.equal(allowed, ~torch.isinf(got[row_ids]))


def test_clear_unless_empty():
    from freight.structured_output.manager import _clear_unless_empty

    def row_of(tokens, words=3):
        bits = np.zeros(words * 32, dtype=bool)
        bits[list(tokens)] = True
        return np.packbits(bits, bitorder="little").view(np.int32).copy()

    def tokens_of(row):
        return set(np.nonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))[0].tolist())

    row = row_of({2, 5, 31, 63, 64})
    _clear_unless_empty(row, [2, 31, 40])           # 40 was not allowed anyway; 31 is a sign bit
    assert tokens_of(row) == {5, 63, 64}
    row = row_of({2, 31})
    _clear_unless_empty(row, [2, 31])               # nothing would be left: the grammar wins
    assert tokens_of(row) == {2, 31}
    row = row_of({2, 95})
    _clear_unless_empty(row, [2, 96, 10_000])       # ids past the row are ignored
    assert tokens_of(row) == {95}
    row = row_of(set())
    _clear_unless_empty(row, [0])
    assert tokens_of(row) == set()


def test_fill_bitmask_applies_min_tokens_ban(stories_engines, stories_tokenizer):
    """The manager's fill_bitmask clears each row's banned tokens, unless that empties the row."""
    llm = stories_engines("auto")
    mgr = _core(llm).structured_outputs({EOS})
    grammars = [mgr.request(SO(regex="[a-z]{1,20}"))] + [mgr.request(SO(choice=["yes", "no"])) for _ in range(2)]
    for g in grammars:
        g.compiled.result(timeout=30)
        assert g.ready() and g.error is None
    # Row 0 after one letter (eos or more letters next); rows 1 and 2 after a whole choice (only eos left).
    assert grammars[0].matcher.accept_token(single_char_ids(stories_tokenizer, ["a"])[0])
    done = gen(llm, PROMPTS[0], SamplingParams(temperature=0, max_tokens=8,
                                               structured_outputs=SO(choice=["yes", "no"])))[0].outputs[0]
    assert done.token_ids[-1] == EOS
    for g in grammars[1:]:
        for t in done.token_ids[:-1]:
            assert g.matcher.accept_token(t)

    def allowed(banned):
        bits = np.unpackbits(mgr.fill_bitmask(grammars, banned).view(np.uint8), axis=1, bitorder="little")
        return [set(np.nonzero(row)[0].tolist()) for row in bits]

    free = allowed([[], [], []])
    assert EOS in free[0] and len(free[0]) > 1 and free[1] == free[2] == {EOS}
    banned = allowed([[EOS], [EOS], []])
    assert banned[0] == free[0] - {EOS}, "the ban must clear eos where other tokens remain"
    assert banned[1] == {EOS}, "a ban that would leave nothing must give way to the grammar"
    assert banned[2] == {EOS}


def test_close_objects_for_disable_additional_properties():
    from freight.structured_output.backend import schema_of

    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "b": {"type": "array", "items": {"properties": {"y": {"type": "string"}}}},
        "c": {"type": "object", "additionalProperties": True}}}
    closed = schema_of(SO(json=schema, disable_additional_properties=True))
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["b"]["items"]["additionalProperties"] is False
    assert closed["properties"]["c"]["additionalProperties"] is True
    assert "additionalProperties" not in schema, "the caller's schema was modified"
    assert schema_of(SO(json=schema)) == closed, "objects are closed with or without the flag"


def test_objects_are_closed_unless_the_schema_opens_them(stories_engines, stories_tokenizer):
    """llguidance: an object without additionalProperties is closed (as xgrammar's strict mode), with or
    without disable_additional_properties; an explicit "additionalProperties": true stays open."""
    llm = stories_engines("guidance")
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}}
    opened = dict(schema, additionalProperties=True)
    bias = {i: 8.0 for i in single_char_ids(stories_tokenizer, ['"', "}"])}
    runs = [(opened, False), (schema, False), (schema, True)]
    params = [SamplingParams(temperature=t, seed=s, max_tokens=40, logit_bias=bias,
                             structured_outputs=SO(json=sch, disable_additional_properties=flag))
              for sch, flag in runs for t, s in [(0, None), (1.0, 1), (1.0, 2)]]
    outs = [o.outputs[0] for o in gen(llm, PROMPTS[:1] * len(params), params)]
    open_keys = set()
    for c in outs[:3]:
        assert_completed(c, check_json(opened), "open object")
        open_keys |= set(json.loads(c.text))
    assert open_keys - {"a"}, "precondition: in an open object the model adds other keys"
    for c in outs[3:]:
        assert_completed(c, check_json(dict(schema, additionalProperties=False)), "closed object")


def test_engine_defaults_join_request_flags(stories_engines):
    """structured_outputs_config flags apply to every request; a request can turn one on by itself."""
    compact = gen(stories_engines("guidance"), PROMPTS[0], SamplingParams(
        temperature=0, max_tokens=80, structured_outputs=SO(json=PERSON)))[0].outputs[0]
    assert_completed(compact, check_json(PERSON), "guidance")
    obj = json.loads(compact.text)
    assert compact.text == json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    llm = stories_engines("plain")  # no defaults: the request sets the flag itself
    o = gen(llm, PROMPTS[0], SamplingParams(temperature=0, max_tokens=80,
                                            structured_outputs=SO(json=PERSON, disable_any_whitespace=True)))
    c = o[0].outputs[0]
    assert_completed(c, check_json(PERSON), "plain engine, request flag")
    assert c.text == json.dumps(json.loads(c.text), ensure_ascii=False)  # xgrammar's ", " and ": " only
    assert c.token_ids == gen(stories_engines("xgrammar"), PROMPTS[0], SamplingParams(
        temperature=0, max_tokens=80, structured_outputs=SO(json=PERSON)))[0].outputs[0].token_ids


# =========================================================================== random model, vocab % 32 != 0

@pytest.fixture(scope="module")
def odd_vocab_model(tmp_path_factory):
    from model_factory import make_model

    return make_model(tmp_path_factory.mktemp("so_odd_vocab") / "llama1000", "llama", vocab_size=1000, seed=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_model_vocab_not_multiple_of_32(odd_vocab_model, backend):
    """vocab 1000 (bitmask of 32 words, the last one part-used) on a random-weight model: every output valid."""
    schema = {"type": "object", "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "c": {"enum": ["red", "green", "blue"]}, "b": {"type": "boolean"}},
              "required": ["k", "c", "b"], "additionalProperties": False}
    cases = [(SO(regex="[0-9]{2,6}"), check_regex("[0-9]{2,6}")),
             (SO(choice=["alpha", "beta", "gamma"]), check_choice(["alpha", "beta", "gamma"])),
             (SO(json=schema), check_json(schema))]
    llm = _new_llm(odd_vocab_model, structured_outputs_config=dict(WS, backend=backend))
    try:
        assert llm.llm_engine.model_config.vocab_size % 32 != 0
        params = [SamplingParams(temperature=t, seed=s, max_tokens=40, structured_outputs=spec)
                  for spec, _ in cases for t, s in [(0, None), (1.0, 1), (1.0, 2)]]
        outs = gen(llm, ["hello world"] * len(params), params)
        for i, o in enumerate(outs):
            check_request(llm, o, cases[i // 3][1], f"{backend} {cases[i // 3][0].kind} #{i % 3}")
    finally:
        llm.llm_engine.shutdown()


# =========================================================================== 11. compiling: cache, waiting, failures

_MARKERS = itertools.count()


def _marker(prefix: str) -> str:
    """A short key name no other test of this module uses (the grammar cache lives as long as the engine)."""
    return f"{prefix}{next(_MARKERS)}"


def _unique_schema(tag: str) -> dict:
    return {"type": "object", "properties": {tag: {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": [tag], "additionalProperties": False}


def test_compile_cache_shares_grammars(stories_engines):
    llm = stories_engines("auto")
    mgr = _core(llm).structured_outputs({EOS})
    times = mgr.compile_times
    schema = _unique_schema(_marker("cache"))
    n0 = len(times)
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=SO(json=schema))
    outs = gen(llm, PROMPTS[:3], [params, params, SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=40,
                                                                  structured_outputs=SO(json=dict(schema)))])
    for o in outs:
        for c in o.outputs:
            assert_completed(c, check_json(schema), "cached grammar")
    assert len(times) == n0 + 1, "three requests (four sequences) with one schema must compile once"
    gen(llm, PROMPTS[0], params)
    assert len(times) == n0 + 1, "a later request with the same schema must hit the cache"
    gen(llm, PROMPTS[0], SamplingParams(temperature=0, max_tokens=40,
                                        structured_outputs=SO(json=schema, disable_additional_properties=True)))
    assert len(times) == n0 + 2, "different flags are a different grammar"
    gen(llm, PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, structured_outputs=SO(json=schema),
                                        seed=3, top_k=5))
    assert len(times) == n0 + 2, "sampling settings are not part of the grammar"


class _Gate:
    """Wraps a backend's compile so that compiles of specs containing `marker` wait for open()."""

    def __init__(self, backend, marker: str, fail: bool = False):
        self.inner, self.marker, self.fail = backend.compile, marker, fail
        self.event, self.entered = threading.Event(), threading.Event()

    @classmethod
    def install(cls, llm, monkeypatch, prefix: str, fail: bool = False) -> "_Gate":
        """A gate on the xgrammar backend of llm's engine core, for specs holding a fresh marker (gate.marker)."""
        backend = _core(llm).structured_outputs({EOS}).backend("xgrammar")
        gate = cls(backend, _marker(prefix), fail)
        monkeypatch.setattr(backend, "compile", gate)
        return gate

    def __call__(self, spec):
        if self.marker in spec.cache_key():
            self.entered.set()
            assert self.event.wait(60), "gate never opened"
            if self.fail:
                from freight.structured_output import GrammarSpecError

                raise GrammarSpecError("injected compile failure")
        return self.inner(spec)


def _step_until(engine, done, limit_s: float = 30.0):
    finished = {}
    deadline = time.monotonic() + limit_s
    while not done(finished):
        assert time.monotonic() < deadline, f"timed out; finished so far: {sorted(finished)}"
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def test_slow_compile_does_not_block_other_requests(stories_engines, monkeypatch):
    llm = stories_engines("auto")
    engine = llm.llm_engine
    gate = _Gate.install(llm, monkeypatch, "slow")
    marker = gate.marker
    slow_schema = _unique_schema(marker)
    gen(llm, PROMPTS[0], SamplingParams(max_tokens=2, structured_outputs=SO(choice=["yes", "no"])))  # cached now
    engine.add_request("slow", PROMPTS[0], SamplingParams(temperature=0, max_tokens=40,
                                                          structured_outputs=SO(json=slow_schema)))
    engine.add_request("plain", PROMPTS[1], SamplingParams(temperature=0, max_tokens=12))
    engine.add_request("cached", PROMPTS[2], SamplingParams(temperature=0, max_tokens=12,
                                                            structured_outputs=SO(choice=["yes", "no"])))
    try:
        assert gate.entered.wait(30)
        finished = _step_until(engine, lambda f: {"plain", "cached"} <= set(f))
        assert "slow" not in finished and engine.has_unfinished_requests()
        waiting = _core(llm).scheduler.get_request("slow")
        assert waiting.status.value == "waiting" and waiting.num_computed_tokens == 0
        assert finished["plain"].outputs[0].finish_reason == "length"
        assert_completed(finished["cached"].outputs[0], check_choice(["yes", "no"]), "cached grammar")
    finally:
        gate.event.set()
    finished = _step_until(engine, lambda f: "slow" in f)
    assert_completed(finished["slow"].outputs[0], check_json(slow_schema), "slow grammar")
    assert not engine.has_unfinished_requests()


def test_abort_while_compiling(stories_engines, monkeypatch):
    llm = stories_engines("auto")
    engine = llm.llm_engine
    gate = _Gate.install(llm, monkeypatch, "abort")
    marker = gate.marker
    engine.add_request("waiting", PROMPTS[0], SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=40,
                                                             structured_outputs=SO(json=_unique_schema(marker))))
    try:
        assert gate.entered.wait(30)
        for _ in range(3):
            engine.step()
        engine.abort_request("waiting")
        assert not engine.has_unfinished_requests() and not _core(llm).has_unfinished_requests()
    finally:
        gate.event.set()
    # The engine goes on; the grammar that finished compiling after the abort is usable.
    o = gen(llm, PROMPTS[1], SamplingParams(temperature=0, max_tokens=40,
                                            structured_outputs=SO(json=_unique_schema(marker))))
    assert_completed(o[0].outputs[0], check_json(_unique_schema(marker)), "after abort")
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_compile_failure_fails_only_its_request(stories_engines, monkeypatch):
    llm = stories_engines("auto")
    engine = llm.llm_engine
    gate = _Gate.install(llm, monkeypatch, "fail", fail=True)
    marker = gate.marker
    gate.event.set()
    params = [SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=20,
                             structured_outputs=SO(json=_unique_schema(marker))),
              SamplingParams(temperature=0, max_tokens=12),
              SamplingParams(temperature=0, max_tokens=30, structured_outputs=SO(regex=WORD_NUM))]
    outs = gen(llm, PROMPTS[:3], params)
    assert [c.finish_reason for c in outs[0].outputs] == ["error", "error"]
    assert all(c.token_ids == [] for c in outs[0].outputs)
    assert outs[1].outputs[0].finish_reason == "length"
    assert_completed(outs[2].outputs[0], check_regex(WORD_NUM), "neighbour of a failed grammar")
    assert not engine.has_unfinished_requests()
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_fork_matcher_failure_fails_only_that_sample(stories_engines, monkeypatch):
    """A sample whose own matcher cannot be made fails alone: its siblings and neighbours finish."""
    llm = stories_engines("auto")
    engine = llm.llm_engine
    backend = _core(llm).structured_outputs({EOS}).backend("xgrammar")
    made, inner = [], backend.matcher

    def matcher(compiled):
        made.append(compiled)
        if len(made) == 2:  # the first fork of the n=3 request
            raise RuntimeError("injected matcher failure")
        return inner(compiled)

    monkeypatch.setattr(backend, "matcher", matcher)
    params = [SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=30, structured_outputs=SO(regex=WORD_NUM)),
              SamplingParams(temperature=0, max_tokens=12)]
    outs = gen(llm, PROMPTS[:2], params)
    reasons = sorted(c.finish_reason for c in outs[0].outputs)
    assert reasons == ["error", "stop", "stop"], reasons
    for c in outs[0].outputs:
        if c.finish_reason == "stop":
            assert_completed(c, check_regex(WORD_NUM), "sibling of a failed sample")
    assert outs[1].outputs[0].finish_reason == "length"
    assert not engine.has_unfinished_requests()
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
