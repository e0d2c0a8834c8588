"""Speculative decoding (n-gram drafts) changes how fast tokens come, never which tokens come.

Every test here runs the same requests through an engine with speculation and one without (or against
transformers) on stories260k, a real trained tiny Llama, and requires the outputs to be identical:
greedy across K and prompt_lookup_min, mixed batches, chunked prefill, preemption, n=2, stop tokens,
stop strings, max_tokens and max_model_len boundaries, penalties / min_tokens / logit_bias, logprobs,
seeded sampling, structured outputs beside speculating requests, disable_by_batch_size, prefix-cache hits
on blocks written while speculating, hypothesis-drawn random batches, and without the C kernels; and
against transformers' generate(). Each run also checks that speculation really happened (drafts proposed AND accepted, so no
test passes vacuously) and that every KV block is free again afterwards.

Oracle drafts: the scheduler's proposer is replaced by one that proposes the true continuation (from a
reference run without speculation): every draft token must be accepted. With one token of each draft
corrupted at a random position, acceptance must stop exactly there and outputs stay identical.

The server test starts `freight serve --speculative-config ...`, sends completions with the official
openai client and checks the vllm:spec_decode_* series on /metrics; the server's collector, fed an engine
without speculation, exports none of them (checked in process: cheaper than a second server).
"""

from __future__ import annotations

import json
import random
import re
import signal
from typing import Optional, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import LLM_DEFAULTS, _limit_threads
from freight.core.stats import SpecDecodingStats
from freight.sampling_params import SamplingParams, StructuredOutputsParams as SO

MAX_TOKENS = 48
# Loops in the prompt (and the model's own loops: stories260k repeats itself a lot) give n-gram matches.
# transformers' greedy continuations of these (40 tokens) have no near-tie (top-2 logit gap < 1e-3), where
# float noise between a 1-row and a (1+K)-row forward could legitimately flip a token ("Lily and her mom
# went to the park" has one, a gap of 1.2e-4, so it is not used).
PROMPTS = [
    "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat. The cat",
    "Once upon a time",
    "Tom said: one, two, three. Tom said: one, two, three. Tom said: one,",
    "Sara had a red hat",
    "The dog ran and ran and ran and ran and ran and",
    "One day, a little bird",
]
ENGINE_KV = "8MiB"  # ~400 blocks of 16 tokens: plenty for these requests, cheap to build many engines


def spec(k: int = 3, lo: Optional[int] = 1, hi: Optional[int] = 3, disable: int = 64, **extra) -> dict:
    cfg = {"method": "ngram", "num_speculative_tokens": k, "disable_by_batch_size": disable, **extra}
    if lo is not None:
        cfg["prompt_lookup_min"] = lo
    if hi is not None:
        cfg["prompt_lookup_max"] = hi
    return cfg


def greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=kw.pop("ignore_eos", True), **kw)


# -- engines ---------------------------------------------------------------------------------------------


def _build(model_dir, **overrides):
    from freight import LLM

    kw = dict(LLM_DEFAULTS, kv_cache_memory=ENGINE_KV)
    kw.update(overrides)
    llm = LLM(model=str(model_dir), **kw)
    _limit_threads()  # the engine sets torch's thread count to every core; undo that
    return llm


def _shutdown(llm) -> None:
    try:
        llm.llm_engine.shutdown()
    except Exception:  # noqa: BLE001 - cleanup must not mask the test's result
        pass


@pytest.fixture(scope="module")
def engine(stories_dir):
    """engine(**LLM overrides) -> an LLM on stories260k, built once per module for each set of overrides."""
    built: dict[str, object] = {}

    def get(**overrides):
        key = json.dumps(overrides, sort_keys=True)
        if key not in built:
            built[key] = _build(stories_dir, **overrides)
        return built[key]

    yield get
    for llm in built.values():
        _shutdown(llm)


# -- running and comparing ---------------------------------------------------------------------------


def spec_stats(llm) -> SpecDecodingStats:
    return llm.llm_engine.get_stats().spec_decoding


def stats_delta(before: SpecDecodingStats, after: SpecDecodingStats) -> SpecDecodingStats:
    return SpecDecodingStats(after.num_drafts - before.num_drafts, after.num_draft_tokens - before.num_draft_tokens,
                             after.num_accepted_tokens - before.num_accepted_tokens,
                             [a - b for a, b in zip(after.accepted_per_pos, before.accepted_per_pos)])


def assert_no_kv_leak(llm, label: str = "") -> None:
    s = llm.llm_engine.get_stats()
    assert s.num_running == 0 and s.num_waiting == 0, f"{label}: requests left: {s}"
    assert s.num_free_blocks == s.num_total_blocks, (
        f"{label}: KV blocks leaked: {s.num_free_blocks} free (or cached) of {s.num_total_blocks}")
    kv = llm.llm_engine.engine_core.scheduler.kv
    assert kv.num_free_blocks == s.num_total_blocks


class Run:
    def __init__(self, outs, stats: SpecDecodingStats, preemptions: int):
        self.outs = outs
        self.stats = stats
        self.preemptions = preemptions

    @property
    def tokens(self) -> list[list[list[int]]]:
        return [[list(c.token_ids) for c in o.outputs] for o in self.outs]


def run(llm, prompts, params, label: str = "") -> Run:
    """Generate (prompts: text or token-id lists), check no KV leak, return outputs and the stats' delta."""
    before, pre = spec_stats(llm), llm.llm_engine.get_stats().num_preemptions
    inputs = [{"prompt_token_ids": list(p)} if not isinstance(p, str) else p for p in prompts]
    outs = llm.generate(inputs, params, use_tqdm=False)
    assert_no_kv_leak(llm, label)
    after = llm.llm_engine.get_stats()
    delta = stats_delta(before, after.spec_decoding)
    check_stats_consistent(delta, label)
    return Run(outs, delta, after.num_preemptions - pre)


def check_stats_consistent(s: SpecDecodingStats, label: str = "") -> None:
    assert 0 <= s.num_accepted_tokens <= s.num_draft_tokens, (label, s)
    k = len(s.accepted_per_pos)
    assert s.num_draft_tokens <= k * s.num_drafts, (label, s)
    assert sum(s.accepted_per_pos) == s.num_accepted_tokens, (label, s)
    assert all(a >= b for a, b in zip(s.accepted_per_pos, s.accepted_per_pos[1:])), (label, s)
    if k:
        assert s.accepted_per_pos[0] <= s.num_drafts, (label, s)


def assert_speculated(r: Run, label: str = "") -> None:
    """Drafts were verified and some accepted: the comparison it goes with is not vacuous."""
    assert r.stats.num_drafts > 0, f"{label}: no drafts at all: {r.stats}"
    assert r.stats.num_accepted_tokens > 0, f"{label}: no draft token accepted: {r.stats}"


def near_tie_note(stories_dir, prompt_ids: Sequence[int], ref: Sequence[int], i: int) -> str:
    """transformers' top-2 logit gap where the outputs diverge (a near-tie there is float noise)."""
    try:
        from hf_reference import hf_logits_for

        import torch

        logits = hf_logits_for(stories_dir, prompt_ids, list(ref[:i + 1]))[i]
        top = torch.topk(logits, 2).values
        return f"; HF top-2 logit gap at the divergence: {float(top[0] - top[1]):.3g}"
    except Exception as e:  # noqa: BLE001 - only a diagnosis
        return f"; (no HF diagnosis: {e})"


def assert_same_outputs(ref: Run, got: Run, label: str, stories_dir=None, check_text: bool = True) -> None:
    problems = []
    for i, (a, b) in enumerate(zip(ref.outs, got.outs)):
        assert list(a.prompt_token_ids) == list(b.prompt_token_ids)
        assert len(a.outputs) == len(b.outputs)
        for j, (x, y) in enumerate(zip(a.outputs, b.outputs)):
            tx, ty = list(x.token_ids), list(y.token_ids)
            if tx != ty:
                d = next((t for t, (p, q) in enumerate(zip(tx, ty)) if p != q), min(len(tx), len(ty)))
                note = (near_tie_note(stories_dir, a.prompt_token_ids, tx, d)
                        if stories_dir is not None and d < min(len(tx), len(ty)) else "")
                problems.append(f"request {i} seq {j}: first difference at output token {d} (of {len(tx)} vs "
                                f"{len(ty)}): without speculation {tx[max(0, d - 3):d + 4]}, with "
                                f"{ty[max(0, d - 3):d + 4]}{note}")
                continue
            if (x.finish_reason, x.stop_reason) != (y.finish_reason, y.stop_reason):
                problems.append(f"request {i} seq {j}: finish {x.finish_reason}/{x.stop_reason} vs "
                                f"{y.finish_reason}/{y.stop_reason}")
            if check_text and x.text != y.text:
                problems.append(f"request {i} seq {j}: text {x.text!r} vs {y.text!r}")
    assert len(ref.outs) == len(got.outs)
    assert not problems, f"{label}: speculation changed the output:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def base(engine):
    return engine()


@pytest.fixture(scope="module")
def prompt_ids(base):
    tok = base.get_tokenizer()
    return [tok.encode(p) for p in PROMPTS]


# -- a. greedy, across K and prompt_lookup_min, in a mixed batch -----------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("lo", [1, 2, 3])
def test_greedy_identical_mixed_batch(engine, base, stories_dir, k, lo):
    # a mixed batch: different prompt lengths and max_tokens, requests finishing at different steps
    params = [greedy(m) for m in (48, 33, 64, 40, 57, 32)]
    ref = run(base, PROMPTS, params)
    llm = engine(speculative_config=spec(k, lo, lo + 2))
    got = run(llm, PROMPTS, params, f"K={k} min={lo}")
    assert_same_outputs(ref, got, f"K={k} prompt_lookup_min={lo}", stories_dir)
    assert_speculated(got, f"K={k} min={lo}")
    assert len(got.stats.accepted_per_pos) == k
    assert [len(o.outputs[0].token_ids) for o in got.outs] == [p.max_tokens for p in params]


def test_greedy_identical_one_request_at_a_time(engine, base, stories_dir):
    """Default disable_by_batch_size, single requests (the configuration that speculates most)."""
    llm = engine(speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
                                     "prompt_lookup_min": 1})
    for i, p in enumerate(PROMPTS[:3]):
        ref = run(base, [p], greedy(64, ignore_eos=False))
        got = run(llm, [p], greedy(64, ignore_eos=False), f"prompt {i}")
        assert_same_outputs(ref, got, f"prompt {i}", stories_dir)
        assert got.stats.num_drafts > 0


def test_default_lookup_sizes(engine, base, stories_dir):
    """prompt_lookup_min/max unset: vLLM's 5/5; long loops in the prompt still give accepted drafts."""
    llm = engine(speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    cfg = llm.llm_engine.engine_core.scheduler.config.speculative
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (5, 5)
    prompts = [PROMPTS[0], PROMPTS[2]]
    ref = run(base, prompts, greedy())
    got = run(llm, prompts, greedy())
    assert_same_outputs(ref, got, "default lookup sizes", stories_dir)
    assert_speculated(got)


# random batches: any mix of prompts, lengths, sampling parameters and engine settings --------------------------


@st.composite
def random_requests(draw):
    n = draw(st.integers(1, 7))
    prompts, params = [], []
    for _ in range(n):
        prompts.append(draw(st.sampled_from(PROMPTS)))
        max_tokens = draw(st.integers(1, 40))
        kind = draw(st.sampled_from(["greedy", "seeded", "penalties", "bias", "n2"]))
        if kind == "greedy":
            p = greedy(max_tokens, ignore_eos=draw(st.booleans()))
        elif kind == "seeded":
            p = SamplingParams(temperature=draw(st.sampled_from([0.5, 0.8, 1.2])),
                               top_p=draw(st.sampled_from([1.0, 0.9])), seed=draw(st.integers(0, 2**32)), max_tokens=max_tokens, ignore_eos=True)
        elif kind == "penalties":
            p = greedy(max_tokens, repetition_penalty=draw(st.sampled_from([0.9, 1.2])),
                       frequency_penalty=draw(st.sampled_from([0.0, 0.3])))
        elif kind == "bias":
            p = greedy(max_tokens, logit_bias={draw(st.integers(3, 511)): draw(st.sampled_from([-5.0, 3.0]))})
        else:
            p = SamplingParams(n=2, temperature=0.9, seed=draw(st.integers(0, 2**32)), max_tokens=max_tokens,
                               ignore_eos=True)
        params.append(p)
    return prompts, params


ENGINE_VARIANTS = [dict(speculative_config=spec(1, 1, 1)), dict(speculative_config=spec(3, 1, 3)),
                   dict(speculative_config=spec(5, 2, 4)),
                   dict(speculative_config=spec(4, 1, 3), max_num_batched_tokens=16),
                   dict(speculative_config=spec(3, 1, 3, disable=3))]


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=random_requests(), variant=st.integers(0, len(ENGINE_VARIANTS) - 1))
def test_random_batches_identical(engine, base, stories_dir, case, variant):
    prompts, params = case
    llm = engine(**ENGINE_VARIANTS[variant])
    ref = run(base, prompts, params)
    got = run(llm, prompts, params, f"variant {variant}")
    assert_same_outputs(ref, got, f"random batch on {ENGINE_VARIANTS[variant]}", stories_dir)


# -- b. chunked prefill, preemption, n=2, stops, max_tokens, max_model_len --------------------------------


LONG = [
    "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat. The cat sat on the mat. The cat sat",
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she",
    "Tom said: one, two, three. Tom said: one, two, three. Tom said: one, two, three. Tom said: one, two,",
]


def test_chunked_prefill_small_budget(engine, base, stories_dir):
    params = greedy(40)
    ref = run(base, LONG + PROMPTS[:2], params)
    llm = engine(speculative_config=spec(4, 1, 3), max_num_batched_tokens=16)
    assert all(len(p) > 16 for p in (llm.get_tokenizer().encode(t) for t in LONG)), "prompts must be chunked"
    got = run(llm, LONG + PROMPTS[:2], params, "chunked")
    assert_same_outputs(ref, got, "chunked prefill, max_num_batched_tokens=16", stories_dir)
    assert_speculated(got)


def test_preemption(engine, base, stories_dir):
    from model_factory import kv_bytes_per_block

    # 6 blocks of 16 tokens for 4 requests of up to 74 tokens each: they must preempt each other
    llm = engine(speculative_config=spec(4, 1, 3), kv_cache_memory=6 * kv_bytes_per_block(stories_dir, 16),
                 max_model_len=80, max_num_batched_tokens=32)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4], PROMPTS[1]]
    params = greedy(36)
    ref = run(base, prompts, params)
    got = run(llm, prompts, params, "preemption")
    assert got.preemptions > 0, "expected preemptions with a 6-block KV cache"
    assert_same_outputs(ref, got, "preemption", stories_dir)
    assert [len(o.outputs[0].token_ids) for o in got.outs] == [36] * 4
    assert_speculated(got)


def test_n2(engine, base, stories_dir):
    llm = engine(speculative_config=spec(3, 1, 3))
    params = [SamplingParams(n=2, temperature=0.0, max_tokens=40, ignore_eos=True),
              SamplingParams(n=2, temperature=0.8, top_p=0.9, seed=11, max_tokens=40, ignore_eos=True),
              SamplingParams(n=2, temperature=1.0, seed=12, max_tokens=40, ignore_eos=True)]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4]]
    ref = run(base, prompts, params)
    got = run(llm, prompts, params, "n=2")
    assert_same_outputs(ref, got, "n=2", stories_dir)
    assert all(len(o.outputs) == 2 for o in got.outs)
    assert_speculated(got)


def test_stop_token_ids_and_stop_strings(engine, base, stories_dir, prompt_ids):
    llm = engine(speculative_config=spec(5, 1, 3))
    full = run(base, [prompt_ids[0], prompt_ids[4]], greedy(48)).tokens
    # stop tokens taken from the reference outputs, deep enough that drafts have been accepted before them
    cases = []
    for p, out in zip([prompt_ids[0], prompt_ids[4]], full):
        seq = out[0]
        for at in (6, 20, 35):
            tok = seq[at]
            cases.append((p, greedy(48, stop_token_ids=[tok]), seq.index(tok)))
    ref = run(base, [c[0] for c in cases], [c[1] for c in cases])
    got = run(llm, [c[0] for c in cases], [c[1] for c in cases], "stop tokens")
    assert_same_outputs(ref, got, "stop_token_ids", stories_dir)
    for (p, params, first), o in zip(cases, got.outs):
        c = o.outputs[0]
        assert c.finish_reason == "stop" and c.stop_reason == params.stop_token_ids[0]
        assert len(c.token_ids) == first + 1, "output must end at the FIRST stop token"
    assert_speculated(got)


def test_stop_strings(engine, base, stories_dir):
    """Several tokens may arrive in one step: the text is cut at the stop string, and the token ids (and
    their logprobs) must end with the token that completed it, as without speculation."""
    llm = engine(speculative_config=spec(5, 1, 3))
    base_text = run(base, [PROMPTS[0]], greedy(48)).outs[0].outputs[0].text
    words = base_text.split()
    stops = [" ".join(words[3:5]), words[10], " ".join(words[-3:-1])]
    params = [greedy(48, stop=[s], logprobs=1) for s in stops] + [
        greedy(48, stop=[stops[1]], include_stop_str_in_output=True)]
    ref = run(base, [PROMPTS[0]] * len(params), params)
    got = run(llm, [PROMPTS[0]] * len(params), params, "stop strings")
    assert all(o.outputs[0].finish_reason == "stop" for o in got.outs)
    assert [o.outputs[0].text for o in got.outs] == [o.outputs[0].text for o in ref.outs]
    assert_speculated(got)
    assert_same_outputs(ref, got, "stop strings", stories_dir)
    for o in got.outs:
        c = o.outputs[0]
        assert c.logprobs is None or len(c.logprobs) == len(c.token_ids)


def test_max_tokens_boundaries(engine, base, stories_dir):
    """Drafts near max_tokens must not overshoot: every length equals max_tokens exactly."""
    llm = engine(speculative_config=spec(5, 1, 3))
    sizes = list(range(1, 14)) + [17, 23]
    params = [greedy(m) for m in sizes]
    prompts = [PROMPTS[4]] * len(sizes)  # drafts accepted from the first steps on
    ref = run(base, prompts, params)
    got = run(llm, prompts, params, "max_tokens")
    assert_same_outputs(ref, got, "max_tokens boundaries", stories_dir)
    assert [len(o.outputs[0].token_ids) for o in got.outs] == sizes
    assert all(o.outputs[0].finish_reason == "length" for o in got.outs)
    assert_speculated(got)


@pytest.fixture(scope="module")
def looping_prompt(base, prompt_ids) -> list[int]:
    """A prompt whose greedy continuation loops from its first token on (the model's own loop: "He wanted to
    see what was inside." over and over), so drafts are accepted right away."""
    out = run(base, [prompt_ids[4]], greedy(40)).tokens[0][0]
    return prompt_ids[4] + out


@pytest.mark.parametrize("room", [1, 2, 5, 11])
def test_max_model_len_boundary(engine, stories_dir, looping_prompt, room):
    """A request ends at max_model_len; drafts must never reach past it."""
    p = looping_prompt
    max_len = len(p) + room
    base_short = engine(max_model_len=max_len)
    llm = engine(speculative_config=spec(5, 1, 3), max_model_len=max_len)
    params = [SamplingParams(temperature=0.0, ignore_eos=True),              # max_tokens: what the room leaves
              SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=room + 7)]
    ref = run(base_short, [p, p], params)
    got = run(llm, [p, p], params, "max_model_len")
    assert_same_outputs(ref, got, f"max_model_len={max_len}", stories_dir)
    assert [len(o.outputs[0].token_ids) for o in got.outs] == [room, room]
    assert all(o.outputs[0].finish_reason == "length" for o in got.outs)
    if room >= 5:
        assert_speculated(got)


def test_prefix_cache_hits_on_blocks_written_while_speculating(engine, base, stories_dir, prompt_ids):
    """Blocks filled during speculative decode (where rejected drafts' KV was written and then overwritten)
    are published to the prefix cache; a later request reusing them must get the same output."""
    llm = engine(speculative_config=spec(5, 1, 3), enable_prefix_caching=True)
    firsts = [prompt_ids[0], prompt_ids[2], prompt_ids[4]]
    got_a = run(llm, firsts, greedy(64), "first")
    assert_speculated(got_a)
    assert got_a.stats.num_accepted_tokens < got_a.stats.num_draft_tokens, "want rejected drafts too"
    # second requests: the first requests' prompts and most of their outputs as prompts
    seconds = [p + t[0][:50] for p, t in zip(firsts, got_a.tokens)]
    ref = run(base, seconds, greedy(24))
    got = run(llm, seconds, greedy(24), "second")
    for p, o in zip(seconds, got.outs):
        assert o.num_cached_tokens >= (len(p) - 1) // 16 * 16 - 16 and o.num_cached_tokens >= 48, (
            f"expected prefix-cache hits beyond the prompt: {o.num_cached_tokens} of {len(p)}")
    assert_same_outputs(ref, got, "prefix cache hits on speculative blocks", stories_dir)


# -- c. penalties, min_tokens, logit_bias, logprobs -----------------------------------------------------


def test_penalties_min_tokens_logit_bias(engine, base, stories_dir, prompt_ids):
    llm = engine(speculative_config=spec(4, 1, 3))
    tok_the = prompt_ids[0][0]  # a token the prompts are full of
    params = [
        greedy(48, repetition_penalty=1.3),
        greedy(48, presence_penalty=0.6),
        greedy(48, frequency_penalty=0.4),
        greedy(48, repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.2),
        greedy(48, repetition_penalty=0.8),  # < 1: favours repeats, so drafts are accepted
        greedy(48, ignore_eos=False, min_tokens=40),
        greedy(48, logit_bias={tok_the: 4.0}),
        greedy(48, logit_bias={tok_the: -100.0}),
        greedy(48),  # a plain request in the same batch
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    prompts[4] = PROMPTS[0]
    ref = run(base, prompts, params)
    got = run(llm, prompts, params, "penalties")
    assert_same_outputs(ref, got, "penalties / min_tokens / logit_bias", stories_dir)
    assert_speculated(got)
    assert len(got.outs[5].outputs[0].token_ids) >= 40


def test_min_tokens_boundary_inside_a_draft(engine, base, stories_dir, looping_prompt):
    """min_tokens bans the stop tokens per position: where a step's drafts straddle the min_tokens
    boundary, the ban must lift at exactly the right position."""
    llm = engine(speculative_config=spec(5, 1, 3))
    cont = run(base, [looping_prompt], greedy(16)).tokens[0][0]  # the loop goes on: drafts are accepted
    stop_ids = [cont[1], cont[4], cont[7]]
    params = [greedy(40, stop_token_ids=stop_ids, min_tokens=m) for m in range(0, 14)]
    prompts = [looping_prompt] * len(params)
    ref = run(base, prompts, params)
    got = run(llm, prompts, params, "min_tokens + stop tokens")
    assert_same_outputs(ref, got, "min_tokens boundary", stories_dir)
    assert_speculated(got)
    lengths = [len(o.outputs[0].token_ids) for o in got.outs]
    assert all(n >= m for n, m in zip(lengths, range(14))) and len(set(lengths)) >= 3, str(lengths)


def test_prompt_logprobs_chunked_beside_drafts(engine, base, stories_dir):
    """A long prompt with prompt_logprobs, prefilled in chunks while other requests verify drafts in the
    same steps (its prompt rows come after their draft rows in the logits)."""
    llm = engine(speculative_config=spec(4, 1, 3), max_num_batched_tokens=24)
    prompts = [PROMPTS[4], PROMPTS[0], LONG[1], LONG[2]]
    params = [greedy(40), greedy(40), greedy(8, prompt_logprobs=2), greedy(8, prompt_logprobs=0, logprobs=2)]
    ref = run(base, prompts, params)
    got = run(llm, prompts, params, "prompt logprobs")
    assert_same_outputs(ref, got, "prompt_logprobs beside drafts", stories_dir)
    assert_speculated(got)
    for a, b in zip(ref.outs[2:], got.outs[2:]):
        assert len(b.prompt_logprobs) == len(b.prompt_token_ids)
        for ra, rb in zip(a.prompt_logprobs, b.prompt_logprobs):
            if ra is None:
                assert rb is None
                continue
            assert set(ra) == set(rb)
            for tid in ra:
                assert getattr(rb[tid], "logprob", rb[tid]) == pytest.approx(getattr(ra[tid], "logprob", ra[tid]),
                                                                             abs=1e-4)


def test_logprobs(engine, base, stories_dir):
    llm = engine(speculative_config=spec(4, 1, 3))
    params = [greedy(40, logprobs=3), greedy(40, logprobs=0), greedy(40, logprobs=3, repetition_penalty=1.2),
              SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True, logprobs=3)]
    prompts = [PROMPTS[0], PROMPTS[4], PROMPTS[2], PROMPTS[0]]
    ref = run(base, prompts, params)
    got = run(llm, prompts, params, "logprobs")
    assert_same_outputs(ref, got, "logprobs", stories_dir)
    assert_speculated(got)
    for i, (a, b, p) in enumerate(zip(ref.outs, got.outs, params)):
        x, y = a.outputs[0], b.outputs[0]
        assert y.logprobs is not None and len(y.logprobs) == len(y.token_ids), (
            f"request {i}: {len(y.logprobs or [])} logprob rows for {len(y.token_ids)} tokens")
        for t, (tok, ra, rb) in enumerate(zip(y.token_ids, x.logprobs, y.logprobs)):
            assert tok in rb, f"request {i} token {t}: the chosen token has no logprob"
            assert len(rb) in (p.logprobs, p.logprobs + 1) and set(ra) == set(rb), (i, t, ra, rb)
            for tid in ra:
                lp_a = getattr(ra[tid], "logprob", ra[tid])
                lp_b = getattr(rb[tid], "logprob", rb[tid])
                assert lp_b == pytest.approx(lp_a, abs=1e-4), (i, t, tid, lp_a, lp_b)
        if x.cumulative_logprob is not None:
            assert y.cumulative_logprob == pytest.approx(x.cumulative_logprob, abs=1e-3)


# -- d. seeded sampling --------------------------------------------------------------------------------------


def test_seeded_sampling_identical(engine, base, stories_dir):
    llm = engine(speculative_config=spec(4, 1, 3))
    prompts = PROMPTS + PROMPTS[:2]
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=48, ignore_eos=True)
              for i in range(len(prompts))]
    params[1] = SamplingParams(temperature=0.8, top_k=20, min_p=0.05, seed=7, max_tokens=48, ignore_eos=True)
    ref = run(base, prompts, params)
    got = run(llm, prompts, params, "seeded")
    assert_same_outputs(ref, got, "seeded sampling")
    assert_speculated(got)
    # and the seeds matter: the same prompts with other seeds give other outputs (the comparison is not trivial)
    assert got.tokens[len(PROMPTS)] != got.tokens[0] and got.tokens[len(PROMPTS) + 1] != got.tokens[1]


# -- e. oracle drafts ------------------------------------------------------------------------------------------


class OracleProposer:
    """Proposes the true continuation of each request (from a reference run), optionally with one token of
    each draft corrupted at a random position; records each draft (context length, draft length, corrupted
    position or None)."""

    def __init__(self, sequences: list[list[int]], k: int, vocab_size: int, corrupt_seed: Optional[int] = None):
        self.sequences = sequences
        self.k = k
        self.vocab_size = vocab_size
        self.rng = random.Random(corrupt_seed) if corrupt_seed is not None else None
        self.drafts: list[tuple[int, int, int, Optional[int]]] = []  # (sequence, context len, length, corrupted)
        self.errors: list[str] = []

    def propose(self, token_ids, max_tokens: int) -> list[int]:
        ctx = list(token_ids)
        matches = [s for s in self.sequences if s[:len(ctx)] == ctx]
        if not matches:
            self.errors.append(f"context of {len(ctx)} tokens is no prefix of any reference: the output diverged")
            return []
        seq = matches[0]
        which = self.sequences.index(seq)
        draft = seq[len(ctx):len(ctx) + min(self.k, max_tokens)]
        corrupt = None
        if draft and self.rng is not None:
            corrupt = self.rng.randrange(len(draft))
            draft[corrupt] = (draft[corrupt] + 1 + self.rng.randrange(self.vocab_size - 1)) % self.vocab_size
        if draft:
            self.drafts.append((which, len(ctx), len(draft), corrupt))
        return draft


ORACLE_K = 4


@pytest.fixture(scope="module")
def oracle_setup(engine, base, prompt_ids, stories_dir):
    """(the spec engine, prompts, params, reference run) for the oracle tests; prompts whose reference has
    no near-tie (top-2 logit gap < 1e-3), where float noise between a 1-row and a (1+K)-row forward could
    legitimately flip a token."""
    from hf_reference import NEAR_TIE, cached_greedy

    n = 40
    prompts = [prompt_ids[i] for i in (1, 3, 5, 0)]
    ref = run(base, prompts, greedy(n))
    for p, toks in zip(prompts, ref.tokens):
        r = cached_greedy(stories_dir, p, n)
        assert r.tokens == toks[0], "the reference must equal transformers' greedy output"
        assert r.min_gap >= NEAR_TIE, f"prompt {p}: a near-tie in the reference (gap {r.min_gap:.2g})"
    llm = engine(speculative_config=spec(ORACLE_K, 1, 3))
    return llm, base, prompts, greedy(n), ref


def expected_per_pos(accepted: list[int], k: int) -> list[int]:
    return [sum(1 for a in accepted if a > i) for i in range(k)]


def test_oracle_true_drafts_all_accepted(oracle_setup, monkeypatch, stories_dir):
    llm, base, prompts, params, ref = oracle_setup
    sequences = [list(p) + t[0] for p, t in zip(prompts, ref.tokens)]
    oracle = OracleProposer(sequences, ORACLE_K, llm.llm_engine.model_config.vocab_size)
    monkeypatch.setattr(llm.llm_engine.engine_core.scheduler, "proposer", oracle)
    got = run(llm, prompts, params, "oracle")
    assert not oracle.errors, oracle.errors
    assert_same_outputs(ref, got, "oracle drafts", stories_dir)
    s = got.stats
    assert s.num_drafts == len(oracle.drafts) > 0
    assert s.num_draft_tokens == sum(d[2] for d in oracle.drafts)
    assert s.num_accepted_tokens == s.num_draft_tokens, f"acceptance rate below 1 with true drafts: {s}"
    assert s.accepted_per_pos == expected_per_pos([d[2] for d in oracle.drafts], ORACLE_K)
    # each step takes a whole draft plus one token: the first drafts are full K long
    assert all(length == ORACLE_K for _, _, length, _ in oracle.drafts[:len(prompts)])
    check_draft_steps(oracle.drafts, [d[2] for d in oracle.drafts])


def test_oracle_corrupted_drafts_stop_at_the_corruption(oracle_setup, monkeypatch, stories_dir):
    llm, base, prompts, params, ref = oracle_setup
    sequences = [list(p) + t[0] for p, t in zip(prompts, ref.tokens)]
    oracle = OracleProposer(sequences, ORACLE_K, llm.llm_engine.model_config.vocab_size, corrupt_seed=1234)
    monkeypatch.setattr(llm.llm_engine.engine_core.scheduler, "proposer", oracle)
    got = run(llm, prompts, params, "corrupted oracle")
    assert not oracle.errors, oracle.errors
    assert_same_outputs(ref, got, "corrupted oracle drafts", stories_dir)
    s = got.stats
    corrupted_at = [d[3] for d in oracle.drafts]
    assert s.num_drafts == len(oracle.drafts) > 0
    assert s.num_draft_tokens == sum(d[2] for d in oracle.drafts)
    assert s.num_accepted_tokens == sum(corrupted_at), f"acceptance must stop at the corrupted token: {s}"
    assert s.accepted_per_pos == expected_per_pos(corrupted_at, ORACLE_K)
    assert 0 < s.num_accepted_tokens < s.num_draft_tokens
    # per draft: the next draft of the same request comes exactly corrupted_at + 1 tokens later
    check_draft_steps(oracle.drafts, corrupted_at)


def check_draft_steps(drafts, accepted: list[int]) -> None:
    """Each request's next draft is proposed after exactly (accepted + 1) more tokens: its accepted drafts
    and the token the model sampled itself (a decode step proposes whenever it has room for a draft)."""
    last: dict[int, tuple[int, int]] = {}
    for (which, ctx_len, _, _), a in zip(drafts, accepted):
        if which in last:
            prev_len, prev_accepted = last[which]
            assert ctx_len == prev_len + prev_accepted + 1, (
                f"sequence {which}: a draft at context {prev_len} with {prev_accepted} accepted tokens, "
                f"the next at {ctx_len}")
        last[which] = (ctx_len, a)


def test_oracle_drafts_with_stop_tokens_and_max_tokens(oracle_setup, monkeypatch, stories_dir):
    """A stop token in the middle of an accepted draft ends the output there (the tokens verified after it
    in the same step are dropped); max_tokens cuts drafts short."""
    llm, base, prompts, params, ref = oracle_setup
    sequences = [list(p) + t[0] for p, t in zip(prompts, ref.tokens)]
    vocab = llm.llm_engine.model_config.vocab_size
    # stop tokens: with K=4 true drafts, output tokens 1-4 come as the first decode step's draft (5 is its
    # own token), 6-9 as the second's, ...: pick a token first occurring at a draft position from 6 on
    stops = []
    for p, t in zip(prompts, ref.tokens):
        at = next(i for i in range(6, len(t[0])) if i % (ORACLE_K + 1) and t[0].index(t[0][i]) == i)
        stops.append((p, greedy(40, stop_token_ids=[t[0][at]], logprobs=2), at))
    oracle = OracleProposer(sequences, ORACLE_K, vocab)
    monkeypatch.setattr(llm.llm_engine.engine_core.scheduler, "proposer", oracle)
    got = run(llm, [c[0] for c in stops], [c[1] for c in stops], "oracle stop tokens")
    assert not oracle.errors, oracle.errors
    assert_same_outputs(run(base, [c[0] for c in stops], [c[1] for c in stops]), got, "oracle + stop tokens",
                        stories_dir)
    assert [len(o.outputs[0].token_ids) for o in got.outs] == [c[2] + 1 for c in stops]
    assert [len(o.outputs[0].logprobs) for o in got.outs] == [c[2] + 1 for c in stops]
    assert all(o.outputs[0].finish_reason == "stop" for o in got.outs)
    assert got.stats.num_accepted_tokens == got.stats.num_draft_tokens > 0
    # not vacuous: each stop token came as an accepted draft token with more tokens after it in its step
    for which, (p, _, at) in enumerate(stops):
        spans = [(ctx - len(p), ctx - len(p) + length) for w, ctx, length, _ in oracle.drafts if w == which]
        assert any(lo <= at < hi for lo, hi in spans), (which, at, spans)
    # max_tokens: drafts never run past it
    sizes = [2, 5, 7, 13]
    oracle = OracleProposer(sequences, ORACLE_K, vocab)
    monkeypatch.setattr(llm.llm_engine.engine_core.scheduler, "proposer", oracle)
    cases = [(p, greedy(m)) for p in prompts for m in sizes]
    got = run(llm, [c[0] for c in cases], [c[1] for c in cases], "oracle max_tokens")
    assert not oracle.errors, oracle.errors
    assert_same_outputs(run(base, [c[0] for c in cases], [c[1] for c in cases]), got, "oracle + max_tokens",
                        stories_dir)
    assert [len(o.outputs[0].token_ids) for o in got.outs] == [m for _ in prompts for m in sizes]
    assert got.stats.num_accepted_tokens == got.stats.num_draft_tokens > 0
    # the prefill gives 1 token, then each decode step a draft of min(K, room - 1) tokens and one more
    want_drafts = want_tokens = 0
    for m in sizes:
        produced = 1
        while produced < m:
            d = min(ORACLE_K, m - produced - 1)
            want_drafts, want_tokens = want_drafts + (d > 0), want_tokens + d
            produced += d + 1
    assert (got.stats.num_drafts, got.stats.num_draft_tokens) == (want_drafts * len(prompts),
                                                                  want_tokens * len(prompts))


# -- g. structured outputs beside speculating requests -------------------------------------------------------


def test_structured_output_requests_get_no_drafts(engine, base, monkeypatch, stories_dir):
    llm = engine(speculative_config=spec(4, 1, 3))
    scheduler = llm.llm_engine.engine_core.scheduler
    drafted: set[str] = set()
    real_schedule = scheduler.schedule

    def schedule():
        out = real_schedule()
        drafted.update(rid for rid, d in out.scheduled_spec_decode_tokens.items() if d)
        return out

    monkeypatch.setattr(scheduler, "schedule", schedule)
    regex = r"[0-9]{3}-[a-z]{2,6}"
    choices = ["The cat sat on the mat", "The dog ran", "yes"]
    params = [greedy(48), SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=SO(regex=regex)),
              greedy(48), SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=SO(choice=choices)),
              greedy(48)]
    prompts = [PROMPTS[0], "The the the the the the the the", PROMPTS[4],
               "The cat sat on the mat. The cat sat on the mat.", PROMPTS[2]]
    ref = run(base, prompts, params)
    got = run(llm, prompts, params, "structured")
    assert_same_outputs(ref, got, "structured outputs in a speculating batch", stories_dir)
    assert_speculated(got)
    ids = [o.request_id for o in got.outs]
    assert drafted & {ids[0], ids[2], ids[4]}, "the plain requests should have had drafts"
    assert not drafted & {ids[1], ids[3]}, f"structured-output requests got drafts: {drafted & {ids[1], ids[3]}}"
    assert re.fullmatch(regex, got.outs[1].outputs[0].text), got.outs[1].outputs[0].text
    assert got.outs[3].outputs[0].text in choices, got.outs[3].outputs[0].text
    assert all(o.outputs[0].finish_reason == "stop" for o in (got.outs[1], got.outs[3]))


# -- h. disable_by_batch_size ---------------------------------------------------------------------------------


def test_disable_by_batch_size(engine, base, stories_dir):
    llm = engine(speculative_config=spec(3, 1, 3, disable=2))
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4]]
    for n in (3, 2, 1):
        ref = run(base, prompts[:n], greedy(40))
        got = run(llm, prompts[:n], greedy(40), f"{n} requests")
        assert_same_outputs(ref, got, f"disable_by_batch_size=2, {n} requests", stories_dir)
        if n > 2:  # equal max_tokens, ignore_eos: all n stay in the engine from first step to last
            assert got.stats.num_drafts == 0, f"{n} requests > disable_by_batch_size=2, still: {got.stats}"
        else:
            assert_speculated(got, f"{n} requests")
    # more requests than the threshold, finishing at different steps: drafts start once few are left
    params = [greedy(8), greedy(8), greedy(48)]
    ref = run(base, prompts, params)
    got = run(llm, prompts, params, "staggered")
    assert_same_outputs(ref, got, "disable_by_batch_size=2, staggered", stories_dir)
    assert got.stats.num_drafts > 0


# -- i. without the C kernels -------------------------------------------------------------------------------------


def test_greedy_identical_without_c_kernels(stories_dir, monkeypatch):
    import torch

    from freight.kernels import paged_decode_available
    from freight.kernels.build import reset_kernel_caches

    monkeypatch.setenv("FREIGHT_DISABLE_C_KERNELS", "1")
    reset_kernel_caches()
    llms = []
    try:
        assert not paged_decode_available(torch.zeros(1, 4, 64)), "the C kernels are still on"
        plain = _build(stories_dir)
        llms.append(plain)
        llm = _build(stories_dir, speculative_config=spec(4, 1, 3))
        llms.append(llm)
        params = [greedy(40), greedy(33), greedy(40), greedy(47)]
        prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[4]]
        ref = run(plain, prompts, params)
        got = run(llm, prompts, params, "no C kernels")
        assert_same_outputs(ref, got, "FREIGHT_DISABLE_C_KERNELS=1", stories_dir)
        assert_speculated(got)
    finally:
        for llm in llms:
            _shutdown(llm)
        monkeypatch.undo()
        reset_kernel_caches()


# -- j. against transformers -----------------------------------------------------------------------------------------


def test_matches_transformers_generate(engine, prompt_ids, stories_dir):
    from hf_reference import cached_greedy, describe_divergence, hf_generate

    llm = engine(speculative_config=spec(5, 1, 4))
    n = 48
    prompts = [prompt_ids[0], prompt_ids[1], prompt_ids[4]]
    got = run(llm, prompts, greedy(n), "vs transformers")
    assert_speculated(got)
    problems = []
    for i, (p, t) in enumerate(zip(prompts, got.tokens)):
        want = hf_generate(stories_dir, p, n)  # transformers' generate(do_sample=False)
        if want != t[0]:
            problems.append(describe_divergence(cached_greedy(stories_dir, p, n), t[0], f"prompt {i}")
                            or f"prompt {i}: generate() {want} vs freight {t[0]}")
    assert not problems, "\n".join(problems)


# -- k. the server's metrics ------------------------------------------------------------------------------------------


SPEC_SERIES = ["vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
               "vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_accepted_tokens_per_pos_total"]


def test_server_exports_spec_decode_metrics(stories_dir, engine, tmp_path):
    from server_utils import RemoteServer, metric, wait_for_idle

    k = 3
    cfg = json.dumps(spec(k, 1, 3))
    srv = RemoteServer(stories_dir, ["--speculative-config", cfg, "--served-model-name", "stories"],
                       tmp_path / "spec.log")
    try:
        client = srv.client()
        base_llm = engine(kv_cache_memory="16MiB")
        texts = []
        for prompt in (PROMPTS[0], PROMPTS[2], PROMPTS[4]):
            r = client.completions.create(model="stories", prompt=prompt, max_tokens=32, temperature=0)
            assert r.usage.completion_tokens == 32 and r.choices[0].finish_reason == "length"
            texts.append(r.choices[0].text)
        want = [o.outputs[0].text for o in base_llm.generate(
            [PROMPTS[0], PROMPTS[2], PROMPTS[4]], SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)]
        assert texts == want, "the server's greedy completions differ from the offline engine's"
        m = wait_for_idle(srv)
        names = {n for n, _ in m}
        missing = [s for s in SPEC_SERIES if s not in names]
        assert not missing, f"missing series: {missing}; have {sorted(n for n in names if 'spec' in n)}"
        drafts = metric(m, "vllm:spec_decode_num_drafts_total")
        draft_tokens = metric(m, "vllm:spec_decode_num_draft_tokens_total")
        accepted = metric(m, "vllm:spec_decode_num_accepted_tokens_total")
        per_pos = [metric(m, "vllm:spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(k)]
        positions = sorted(dict(ls)["position"] for n, ls in m if n == SPEC_SERIES[3])
        assert positions == [str(i) for i in range(k)]
        assert drafts > 0 and draft_tokens >= drafts
        assert 0 < accepted <= draft_tokens <= k * drafts
        assert sum(per_pos) == accepted
        assert all(a >= b for a, b in zip(per_pos, per_pos[1:])), per_pos
        for (name, labels), _ in m.items():
            if name in SPEC_SERIES:
                assert ("model_name", "stories") in labels, (name, labels)
    finally:
        code = srv.stop(signal.SIGTERM)
    assert code == 0, f"server exit code {code}:\n{srv.log_tail()}"
    assert "Traceback" not in (tmp_path / "spec.log").read_text(errors="replace"), srv.log_tail()


def test_metrics_without_speculation_have_no_spec_series(engine, base):
    """The server's collector (in process, fed real engines' stats): no vllm:spec_decode_* series without
    speculation, all four with it. (Cheaper than a second server process.)"""
    from prometheus_client import generate_latest

    from freight.metrics import ServerMetrics

    run(base, [PROMPTS[0]], greedy(8))
    text = generate_latest(ServerMetrics("m", lambda: [base.llm_engine.get_stats()]).registry).decode()
    assert "spec_decode" not in text
    llm = engine(speculative_config=spec(3, 1, 3))
    run(llm, [PROMPTS[0]], greedy(8))
    text = generate_latest(ServerMetrics("m", lambda: [llm.llm_engine.get_stats()]).registry).decode()
    for name in SPEC_SERIES:
        assert f"\n{name}{{" in text, name


def test_stats_merge_across_engines():
    """Data parallelism sums the engines' stats: speculative counters add up position by position."""
    from freight.core.stats import SchedulerStats, sum_stats

    a, b = SpecDecodingStats.empty(3), SpecDecodingStats.empty(3)
    a.observe(3, 2)
    a.observe(2, 0)
    b.observe(3, 3)
    total = sum_stats([SchedulerStats(spec_decoding=a), SchedulerStats(spec_decoding=b)]).spec_decoding
    assert total == SpecDecodingStats(3, 8, 5, [2, 2, 1])
    check_stats_consistent(total)
    assert sum_stats([SchedulerStats(), SchedulerStats()]).spec_decoding.accepted_per_pos == []
