"""NgramProposer (n-gram prompt lookup) and SpeculativeConfig (vLLM's --speculative-config).

NgramProposer(min_n, max_n, k).propose(token_ids, max_tokens): the longest suffix of token_ids of
min_n..max_n tokens that occurs earlier (followed by at least one token) is found; the draft is the
tokens that followed its LATEST earlier occurrence, at most min(k, max_tokens) of them, continued
periodically when that occurrence runs into the suffix itself (a loop). [] when nothing matches.

Here: hand-written cases for each rule, then a hypothesis property against a straightforward reference
(for every n from max_n down to min_n, scan all earlier occurrences) over a small alphabet, where
matches of every length are common.

SpeculativeConfig: vLLM's defaults (prompt_lookup_min/max both unset -> 5/5, one set -> the other equals
it), the errors, the old {"model": "ngram"} spelling, JSON strings from the CLI, and EngineConfig /
the CLI parser carrying it.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from freight.spec_decode.config import DEFAULT_DISABLE_BY_BATCH_SIZE, SpeculativeConfig
from freight.spec_decode.ngram_proposer import NgramProposer


def propose(tokens, min_n=1, max_n=5, k=5, max_tokens=100):
    return NgramProposer(min_n, max_n, k).propose(list(tokens), max_tokens)


# -- reference implementation ---------------------------------------------------------------------


def continue_from(tokens: list[int], start: int, count: int) -> list[int]:
    """`count` tokens copied from position `start` on, each copy able to read the ones already copied
    (LZ77-style: a source that reaches the end of the context repeats with period len(tokens) - start)."""
    ext = list(tokens)
    for i in range(count):
        ext.append(ext[start + i])
    return ext[len(tokens):]


def occurrences(tokens: list[int], n: int) -> list[int]:
    """Starts j of the earlier occurrences of the last n tokens that are followed by at least one token."""
    length = len(tokens)
    suffix = tokens[length - n:]
    return [j for j in range(0, length - n) if tokens[j:j + n] == suffix]


def reference_propose(tokens: list[int], min_n: int, max_n: int, k: int, max_tokens: int) -> list[int]:
    count = min(k, max_tokens)
    if count <= 0:
        return []
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        hits = occurrences(tokens, n)
        if hits:
            return continue_from(tokens, hits[-1] + n, count)
    return []


# -- the rules, one by one --------------------------------------------------------------------------


def test_no_match_gives_nothing():
    assert propose([1, 2, 3, 4, 5, 6]) == []
    assert propose([7, 7, 1, 2, 3], min_n=2) == []  # (3) and (2, 3) never occurred before


def test_short_contexts():
    for tokens in ([], [5]):
        assert propose(tokens) == []
        assert propose(tokens, min_n=1, max_n=1, k=1) == []
    # a context no longer than min_n cannot have an earlier occurrence of its suffix
    assert propose([4, 4], min_n=2) == []
    assert propose([4, 4, 4], min_n=3, max_n=3) == []
    # the shortest contexts that can match
    assert propose([4, 4], min_n=1, max_n=1, k=3) == [4, 4, 4]
    assert propose([4, 4, 4], min_n=2, max_n=2, k=2) == [4, 4]
    assert propose([1, 2, 1], min_n=1, max_n=5, k=1) == [2]


def test_longest_match_wins_over_shorter():
    # suffix (1, 2): the 1-gram "2" last occurred at index 5 (followed by 8), the 2-gram "1 2" at 0 (followed by 7)
    tokens = [1, 2, 7, 0, 0, 2, 8, 9, 1, 2]
    assert propose(tokens, min_n=1, max_n=1, k=2) == [8, 9]
    assert propose(tokens, min_n=1, max_n=2, k=2) == [7, 0]
    assert propose(tokens, min_n=2, max_n=5, k=2) == [7, 0]
    # three tokens beat two even when the 2-gram occurs later
    tokens = [5, 1, 2, 30, 31, 9, 1, 2, 40, 41, 5, 1, 2]
    assert propose(tokens, min_n=1, max_n=3, k=2) == [30, 31]
    assert propose(tokens, min_n=1, max_n=2, k=2) == [40, 41]


def test_latest_occurrence_wins():
    tokens = [3, 10, 3, 11, 3, 12, 3]
    assert propose(tokens, min_n=1, max_n=1, k=1) == [12]
    assert propose(tokens, min_n=1, max_n=1, k=2) == [12, 3]
    # the same for a 2-gram: (1, 2) at 0 -> 5, at 3 -> 6, at 7 -> 8 (the latest)
    tokens = [1, 2, 5, 1, 2, 6, 0, 1, 2, 8, 0, 1, 2]
    assert propose(tokens, min_n=2, max_n=2, k=1) == [8]


def test_min_n_bound():
    # only a 1-gram matches: min_n=2 rules it out
    tokens = [9, 4, 6, 7, 4]
    assert propose(tokens, min_n=1, max_n=3, k=2) == [6, 7]
    assert propose(tokens, min_n=2, max_n=3, k=2) == []


def test_max_n_bound():
    # a 3-gram match at 0 (-> 50) and a later 2-gram match at 5 (-> 60): max_n=2 must not see the 3-gram
    tokens = [7, 1, 2, 50, 51, 8, 1, 2, 60, 61, 7, 1, 2]
    assert propose(tokens, min_n=1, max_n=3, k=2) == [50, 51]
    assert propose(tokens, min_n=1, max_n=2, k=2) == [60, 61]
    assert propose(tokens, min_n=2, max_n=2, k=2) == [60, 61]
    # max_n larger than the context is fine
    assert propose([1, 2, 3, 1, 2], min_n=1, max_n=50, k=1) == [3]


def test_k_and_max_tokens_limit_the_draft():
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    assert propose(tokens, k=5, max_tokens=100) == [3, 4, 5, 6, 7]
    assert propose(tokens, k=3, max_tokens=100) == [3, 4, 5]
    assert propose(tokens, k=5, max_tokens=2) == [3, 4]
    assert propose(tokens, k=5, max_tokens=1) == [3]
    assert propose(tokens, k=5, max_tokens=0) == []
    assert propose(tokens, k=5, max_tokens=-3) == []
    # k beyond what follows the occurrence: (1, 2) at 0 is followed by 8 tokens up to the context's end,
    # after which the draft loops with period 8
    assert propose(tokens, k=20, max_tokens=100) == [3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6]


def test_periodic_continuation():
    # the whole context is a loop of period 1, 2, 3: the draft keeps looping for all k tokens
    assert propose([7] * 4, min_n=1, max_n=3, k=6) == [7] * 6
    assert propose([1, 2, 1, 2, 1], min_n=1, max_n=5, k=5) == [2, 1, 2, 1, 2]
    assert propose([1, 2, 3, 1, 2, 3], min_n=1, max_n=5, k=7) == [1, 2, 3, 1, 2, 3, 1]
    # the latest occurrence of (1, 2) starts at 2 and runs into the suffix (4, 5): period 6 - 4 = 2
    tokens = [9, 8, 1, 2, 1, 2]
    assert propose(tokens, min_n=2, max_n=2, k=5) == [1, 2, 1, 2, 1]
    # a loop after a non-repeating head: the head is never drafted
    tokens = [5, 6, 1, 2, 3, 1, 2, 3, 1, 2]
    assert propose(tokens, min_n=2, max_n=5, k=8) == [3, 1, 2, 3, 1, 2, 3, 1]


def test_numpy_and_tuple_inputs_give_plain_ints():
    import numpy as np

    out = NgramProposer(1, 3, 3).propose(np.array([1, 2, 3, 1, 2]), 10)
    assert out == [3, 1, 2] and all(type(t) is int for t in out)
    assert NgramProposer(1, 3, 3).propose((1, 2, 3, 1, 2), 10) == [3, 1, 2]


def test_large_token_ids():
    big = 2**31 - 1
    assert propose([big, 0, big], min_n=1, max_n=2, k=2) == [0, big]


# -- the property -----------------------------------------------------------------------------------


@st.composite
def proposer_cases(draw):
    min_n = draw(st.integers(1, 4))
    max_n = draw(st.integers(min_n, 6))
    k = draw(st.integers(1, 8))
    tokens = draw(st.lists(st.integers(0, draw(st.integers(1, 4))), max_size=40))
    max_tokens = draw(st.integers(0, 10))
    return tokens, min_n, max_n, k, max_tokens


@settings(max_examples=600, deadline=None)
@given(proposer_cases())
@example(([1, 2, 1, 2, 1, 2], 1, 3, 8, 10))
@example(([0, 0, 0], 1, 1, 4, 10))
@example(([0, 1, 0, 0, 1], 2, 3, 5, 10))
def test_drafts_follow_an_earlier_occurrence_of_a_suffix(case):
    tokens, min_n, max_n, k, max_tokens = case
    draft = NgramProposer(min_n, max_n, k).propose(tokens, max_tokens)
    count = min(k, max_tokens)
    assert len(draft) <= max(count, 0)
    # the weak property: some suffix of min_n..max_n tokens occurred earlier, and the draft is what
    # followed that occurrence (periodically continued); empty only when no suffix occurred earlier
    explanations = [(n, j) for n in range(min_n, min(max_n, len(tokens) - 1) + 1)
                    for j in occurrences(tokens, n)]
    if draft:
        assert len(draft) == count, "a match always gives a full draft (periodic continuation)"
        assert any(continue_from(tokens, j + n, count) == draft for n, j in explanations), (
            f"draft {draft} follows no earlier occurrence of any suffix")
    else:
        assert count <= 0 or not explanations, f"no draft although the suffix occurs earlier: {explanations}"
    # the exact rule: the longest suffix, its latest occurrence
    assert draft == reference_propose(tokens, min_n, max_n, k, max_tokens)


# -- SpeculativeConfig --------------------------------------------------------------------------------


def test_config_defaults():
    cfg = SpeculativeConfig(num_speculative_tokens=3)
    assert cfg.method == "ngram"
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (5, 5)  # vLLM: both unset -> 5 and 5
    assert cfg.disable_by_batch_size == DEFAULT_DISABLE_BY_BATCH_SIZE
    assert SpeculativeConfig.parse(None) is None
    assert SpeculativeConfig.parse(cfg) is cfg
    assert cfg.to_dict() == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5,
                             "prompt_lookup_min": 5, "disable_by_batch_size": DEFAULT_DISABLE_BY_BATCH_SIZE}
    assert SpeculativeConfig.parse(cfg.to_dict()) == cfg


@pytest.mark.parametrize("given_, want", [
    ({}, (5, 5)),
    ({"prompt_lookup_max": 3}, (3, 3)),     # one set: the other takes its value
    ({"prompt_lookup_min": 2}, (2, 2)),
    ({"prompt_lookup_min": 1, "prompt_lookup_max": 4}, (1, 4)),
    ({"prompt_lookup_min": 7}, (7, 7)),     # above the default 5: max follows min, no error
    ({"prompt_lookup_max": 1}, (1, 1)),     # below the default 5: min follows max, no error
])
def test_vllm_min_max_defaulting(given_, want):
    cfg = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2, **given_})
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == want


def test_parse_json_string_and_dict_agree():
    d = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
         "disable_by_batch_size": 16}
    a = SpeculativeConfig.parse(json.dumps(d))
    b = SpeculativeConfig.parse(d)
    assert a == b == SpeculativeConfig(**d)
    assert d == {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
                 "disable_by_batch_size": 16}, "parse must not modify the caller's dict"


@pytest.mark.parametrize("spelling", [{"model": "ngram"}, {"model": "[ngram]"}, {"method": "[ngram]"},
                                      {"model": "ngram", "method": "ngram"}])
def test_old_ngram_spellings_accepted(spelling):
    cfg = SpeculativeConfig.parse({**spelling, "num_speculative_tokens": 2})
    assert cfg.method == "ngram" and cfg.num_speculative_tokens == 2


@pytest.mark.parametrize("value, match", [
    ({"method": "eagle", "num_speculative_tokens": 2}, r"method 'eagle' is not supported"),
    ({"method": "medusa", "num_speculative_tokens": 2}, r"not supported"),
    ({"method": "ngram"}, r"num_speculative_tokens must be a positive integer"),  # 0 by default
    ({"method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens must be a positive integer"),
    ({"method": "ngram", "num_speculative_tokens": -1}, r"num_speculative_tokens must be a positive integer"),
    ({"method": "ngram", "num_speculative_tokens": "3"}, r"num_speculative_tokens must be a positive integer"),
    ({"method": "ngram", "num_speculative_tokens": 2.5}, r"num_speculative_tokens must be a positive integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     r"prompt_lookup_min=4 must be <= prompt_lookup_max=2"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, r"prompt_lookup_min=0 must be > 0"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0, "prompt_lookup_max": 3},
     r"prompt_lookup_min=0"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}, r"disable_by_batch_size"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, r"unknown keys \['lookahead'\]"),
    ({"model": "meta-llama/Llama-3.2-1B", "num_speculative_tokens": 2}, r"draft models are not supported"),
    ({"model": "ngram", "method": "eagle", "num_speculative_tokens": 2}, r"not supported"),
    ("{not json", r"not valid JSON"),
    ("", r"not valid JSON"),
    ("[1, 2]", r"must be a JSON object"),
    ("3", r"must be a JSON object"),
    ([("method", "ngram")], r"must be a JSON object"),
])
def test_config_errors(value, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.parse(value)


def test_engine_config_parses_it():
    from freight.config import EngineConfig

    cfg = EngineConfig(model="unused", speculative_config='{"method": "ngram", "num_speculative_tokens": 3}')
    assert isinstance(cfg.speculative_config, SpeculativeConfig)
    assert cfg.speculative_config.num_speculative_tokens == 3
    assert EngineConfig(model="unused").speculative_config is None
    with pytest.raises(ValueError, match="draft models are not supported"):
        EngineConfig(model="unused", speculative_config={"model": "some/draft", "num_speculative_tokens": 3})


def test_cli_flag_reaches_the_engine_config():
    import argparse

    from freight.cli.engine_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser, model_positional=True)
    args = parser.parse_args(["some-model", "--speculative-config",
                              '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'])
    cfg = engine_config_from_args(args).speculative_config
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (4, 3, 3)
    args = parser.parse_args(["some-model"])
    assert engine_config_from_args(args).speculative_config is None
