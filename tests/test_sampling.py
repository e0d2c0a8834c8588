"""Sampling and output semantics (issue 4): SamplingParams end to end.

Every expected value here is computed independently of freight:

- Sampling distributions: a fixed logit vector is put in a batch of 20,000 rows
  (the sampler is batched) and the empirical token frequencies are checked with a
  chi-square goodness-of-fit test (alpha = 1e-4, fixed seeds so nothing is flaky)
  against the filtered, renormalised distribution computed here in float64 numpy
  (temperature, then min_p, top-k and top-p, the order vLLM uses). Filtered-out tokens
  must never be drawn, and each test also shows it has power: the same counts must
  reject the distribution of a 15% wrong temperature.
- Penalties: repetition penalty via transformers' RepetitionPenaltyLogitsProcessor
  (over prompt + output), presence/frequency as OpenAI defines them (over the output),
  logit_bias additive (before the penalties, as vLLM applies it); unit level and end to
  end against a transformers greedy loop.
- Logprobs against transformers' log_softmax on a random-weight model.
- Stops, seeds, n/best_of, streaming holdback, validation: end to end via LLM /
  LLMEngine on stories260k (skipped with a reason when /work/shared is missing).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from freight import SamplingParams
from freight.core.request import Request
from freight.sampling_params import SamplingParamsError
from freight.worker.sampler import Sampler, apply_penalties
from freight.worker.sampling_tensors import SamplingTensors

CPU = torch.device("cpu")
EOS = 2  # eos id of stories260k and of the model_factory models
ALPHA = 1e-4  # chi-square: reject "sampler matches the reference" below this p-value
N_SAMPLES = 20_000

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she saw a big red ball under a tree. She wanted to play with it, but it was too high. "
    "Lily asked her mom for help. Her mom smiled and said, \"Let's get it together.\" They found a long stick "
    "and pushed the ball down. Lily was very happy. She played with the ball all day long. "
    "The next day, Tom came to the park. Tom was a boy who liked to run and jump. He saw Lily and her ball and "
    "said, \"Can I play too?\" Lily said, \"Yes, we can share.\" They threw the ball to each other and laughed."
)


# =========================================================================== helpers

def make_request(params: SamplingParams, prompt=(1, 5, 7), output=(), rid="r", eos=(EOS,)) -> Request:
    req = Request(request_id=rid, prompt_token_ids=list(prompt), sampling_params=params,
                  max_tokens=params.max_tokens or 16, eos_token_ids=frozenset(eos))
    for t in output:
        req.append_token(t)
    return req


def sampling_tensors(reqs, vocab_size, generators=None) -> SamplingTensors:
    return SamplingTensors.from_requests(reqs, generators or [None] * len(reqs), vocab_size, CPU)


def fixed_logits(vocab: int = 32, seed: int = 1234, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g, dtype=torch.float64) * scale


def reference_distribution(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, min_margin=1e-3):
    """The distribution a row samples from, in float64: softmax(logits / T), then min_p, top-k, top-p
    (top-p over the renormalised survivors, always keeping the top token), renormalised.

    Asserts that no token sits within `min_margin` of a min_p floor or top_p boundary, so float32
    rounding in the engine cannot flip a decision and the test stays robust.
    """
    x = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    keep = np.ones(len(p), dtype=bool)
    if min_p > 0:
        floor = min_p * p.max()
        assert np.min(np.abs(p - floor)) / p.max() > min_margin, "test premise: a token sits on the min_p floor"
        keep &= p >= floor
    order = np.argsort(-p, kind="stable")
    if 0 < top_k < len(p):
        assert p[order[top_k - 1]] - p[order[top_k]] > 1e-9, "test premise: a tie at the top-k boundary"
        keep[order[top_k:]] = False
    if top_p < 1.0:
        q = np.where(keep, p, 0.0)
        q /= q.sum()
        qs = q[order]
        above = np.cumsum(qs) - qs  # mass ranked strictly above each token
        live = qs > 0
        assert np.min(np.abs(above[live] - top_p)) > min_margin, "test premise: a token sits on the top_p boundary"
        keep[order[above >= top_p]] = False
    out = np.where(keep, p, 0.0)
    return out / out.sum()


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness-of-fit p-value of `counts` under `probs` (bins expecting < 5 are pooled).

    Any count on a zero-probability token gives p = 0.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    if counts[probs == 0].sum() > 0:
        return 0.0
    exp = probs * n
    big = exp >= 5
    obs_bins = list(counts[big])
    exp_bins = list(exp[big])
    small = (~big) & (probs > 0)
    if small.any():
        obs_bins.append(counts[small].sum())
        exp_bins.append(exp[small].sum())
    obs_bins, exp_bins = np.array(obs_bins), np.array(exp_bins)
    df = len(obs_bins) - 1
    if df < 1:
        return 1.0
    stat = float(((obs_bins - exp_bins) ** 2 / exp_bins).sum())
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def draw(logits: torch.Tensor, params_per_row: list[SamplingParams], seed: int = 0,
         generators=None) -> torch.Tensor:
    """Sample one token per row; row i uses params_per_row[i] and logits (shared [V] or [B, V])."""
    reqs = [make_request(p, rid=f"r{i}") for i, p in enumerate(params_per_row)]
    b = len(reqs)
    if logits.dim() == 1:
        logits = logits[None, :].expand(b, -1)
    st = sampling_tensors(reqs, logits.shape[1], generators)
    return Sampler(seed, CPU)(logits.float().contiguous(), st).token_ids


# =========================================================================== distributions

SAMPLING_CONFIGS = {
    "temperature_1": dict(temperature=1.0),
    "temperature_0.5": dict(temperature=0.5),
    "temperature_2": dict(temperature=2.0),
    "temperature_0.3": dict(temperature=0.3),
    "temperature_0.05": dict(temperature=0.05),  # near-greedy
    "top_k_5": dict(temperature=1.0, top_k=5),
    "top_k_1": dict(temperature=1.0, top_k=1),
    "top_p_0.8": dict(temperature=1.0, top_p=0.8),
    "top_p_0.3": dict(temperature=1.0, top_p=0.3),
    "min_p_0.1": dict(temperature=1.0, min_p=0.1),
    "t0.7_top_k10_top_p0.9": dict(temperature=0.7, top_k=10, top_p=0.9),
    "t1.5_min_p0.05_top_p0.85": dict(temperature=1.5, min_p=0.05, top_p=0.85),
    "t1.3_all_filters": dict(temperature=1.3, top_k=12, top_p=0.87, min_p=0.02),
    "t1.2_top_k20_min_p0.2": dict(temperature=1.2, top_k=20, min_p=0.2),
}


def _check_counts(name: str, tokens: torch.Tensor, logits: torch.Tensor, cfg: dict) -> None:
    vocab = logits.shape[-1]
    counts = np.bincount(tokens.numpy(), minlength=vocab)
    ref = reference_distribution(logits.numpy(), **cfg)
    banned = np.flatnonzero(ref == 0)
    assert counts[banned].sum() == 0, (
        f"{name}: filtered-out tokens were sampled: "
        f"{ {int(t): int(counts[t]) for t in banned if counts[t]} } (support {np.flatnonzero(ref).tolist()})")
    p = chi_square_p(counts, ref)
    worst = np.argsort(-np.abs(counts - ref * counts.sum()))[:3]
    assert p > ALPHA, (
        f"{name}: empirical frequencies do not match the reference (chi-square p={p:.3g}); largest deviations "
        + ", ".join(f"token {t}: {counts[t]} drawn vs {ref[t] * counts.sum():.1f} expected" for t in worst))
    if ref.max() < 0.9:
        # Power: the same counts must reject a distribution with a 15% temperature error.
        alt = reference_distribution(logits.numpy(), **dict(cfg, temperature=cfg.get("temperature", 1.0) * 1.15),
                                     min_margin=0.0)
        assert chi_square_p(counts, alt) < ALPHA, f"{name}: the test cannot tell a 15% temperature error apart"


@pytest.mark.parametrize("name", list(SAMPLING_CONFIGS))
def test_sampling_frequencies_match_reference(name):
    """20k draws from one logit vector follow the filtered, renormalised softmax (chi-square)."""
    cfg = SAMPLING_CONFIGS[name]
    logits = fixed_logits()
    tokens = draw(logits, [SamplingParams(**cfg)] * N_SAMPLES, seed=list(SAMPLING_CONFIGS).index(name))
    _check_counts(name, tokens, logits, cfg)


def test_sampler_probs_equal_reference_exactly():
    """Sampler.probs (the distribution rows sample from) equals the reference within float32 error,
    for every config at once in one batch (rows must not mix their parameters)."""
    logits = fixed_logits()
    names = list(SAMPLING_CONFIGS)
    reqs = [make_request(SamplingParams(**SAMPLING_CONFIGS[n]), rid=n) for n in names]
    st = sampling_tensors(reqs, logits.shape[0])
    probs = Sampler(0, CPU).probs(logits.float()[None].expand(len(names), -1).contiguous(), st)
    for i, n in enumerate(names):
        ref = reference_distribution(logits.numpy(), **SAMPLING_CONFIGS[n])
        got = probs[i].double().numpy()
        assert (got[ref == 0] == 0).all(), f"{n}: filtered-out tokens {np.flatnonzero(got[ref == 0]).tolist()} " \
                                           f"have probability {got[ref == 0]}"
        assert (got[ref > 1e-6] > 0).all(), f"{n}: kept tokens have probability 0"
        assert np.allclose(got, ref, atol=2e-6, rtol=1e-4), f"{n}: max |diff| {np.abs(got - ref).max():.3g}"


def test_disabled_top_p_keeps_full_support_in_a_batch():
    """A row with top_p=1.0 (off) samples from the same distribution whether or not another row of
    the batch uses top_p: its low-probability tail must not be cut (batch invariance)."""
    vocab = 64
    logits = torch.linspace(0.0, -60.0, vocab)  # a long tail, down to e^-60 (representable in float32)
    off = make_request(SamplingParams(temperature=1.0), rid="off")
    nucleus = make_request(SamplingParams(temperature=1.0, top_p=0.5), rid="nucleus")
    sampler = Sampler(0, CPU)
    alone = sampler.probs(logits[None].clone(), sampling_tensors([off], vocab))[0]
    batched = sampler.probs(torch.stack([logits, logits]), sampling_tensors([off, nucleus], vocab))[0]
    assert (alone > 0).all(), "premise: alone, every token has nonzero probability"
    cut = (batched == 0).nonzero().flatten().tolist()
    assert not cut, (f"top_p=1.0 row lost {len(cut)} of {vocab} tokens (ids {cut[0]}..{cut[-1]}, probabilities "
                     f"up to {float(alone[cut].max()):.3g}) because another row of the batch uses top_p")


def test_mixed_batch_rows_sample_their_own_distribution():
    """One batch interleaving different logits and params, plus greedy rows: every row's
    frequencies match its own reference, greedy rows always take their argmax."""
    vocab = 24
    cfg_names = ["temperature_0.5", "top_k_5", "top_p_0.8", "min_p_0.1", "t1.3_all_filters"]
    logit_rows = [fixed_logits(vocab, seed=10 + i) for i in range(len(cfg_names))]
    greedy_logits = fixed_logits(vocab, seed=99)
    per = 12_000
    params, rows, kinds = [], [], []
    for j in range(per):
        for i, n in enumerate(cfg_names):
            params.append(SamplingParams(**SAMPLING_CONFIGS[n]))
            rows.append(logit_rows[i])
            kinds.append(i)
        if j % 8 == 0:
            params.append(SamplingParams(temperature=0.0))
            rows.append(greedy_logits)
            kinds.append(-1)
    tokens = draw(torch.stack(rows), params, seed=5)
    kinds = torch.tensor(kinds)
    greedy_tokens = tokens[kinds == -1]
    assert (greedy_tokens == int(greedy_logits.argmax())).all(), "a greedy row in a mixed batch did not take argmax"
    for i, n in enumerate(cfg_names):
        _check_counts(f"mixed batch / {n}", tokens[kinds == i], logit_rows[i], SAMPLING_CONFIGS[n])


def test_masked_tokens_never_sampled():
    """Tokens at -inf (banned, or biased by -100 far below the rest) are never drawn, even at high temperature."""
    vocab = 16
    logits = torch.zeros(vocab, dtype=torch.float64)
    logits[3] = float("-inf")
    params = SamplingParams(temperature=5.0, logit_bias={7: -100.0})
    tokens = draw(logits, [params] * N_SAMPLES, seed=3)
    counts = np.bincount(tokens.numpy(), minlength=vocab)
    assert counts[3] == 0 and counts[7] == 0, counts
    ref = np.ones(vocab) / (vocab - 2)
    ref[[3, 7]] = 0
    assert chi_square_p(counts, ref) > ALPHA, counts


def test_seeded_rows_independent_of_batch():
    """A row with its own seeded generator draws the same tokens alone and at any position of a
    batch with other (greedy, unseeded, differently filtered) rows."""
    vocab = 32
    logits = fixed_logits(vocab, seed=7, scale=1.0)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=42)

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    def run(batch_params, batch_gens, steps=20):
        # The generators persist across steps, as the model runner keeps them per request.
        out = [draw(logits, batch_params, seed=step, generators=batch_gens) for step in range(steps)]
        return torch.stack(out)  # [steps, B]

    alone = run([seeded], [gen(42)])[:, 0]
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=1.0, seed=7)]
    for pos in (0, 2, 4):
        batch = list(others)
        batch.insert(pos, seeded)
        gens = [None, None, None, gen(7)]
        gens.insert(pos, gen(42))
        got = run(batch, gens)[:, pos]
        assert torch.equal(got, alone), f"seeded row at position {pos}: {got.tolist()} vs alone {alone.tolist()}"
    assert len(set(alone.tolist())) > 1, "test premise: the seeded row actually samples"


# =========================================================================== penalties and logit_bias

def reference_processed_logits(logits: torch.Tensor, prompt, output, rep=1.0, presence=0.0, frequency=0.0,
                               logit_bias=None) -> torch.Tensor:
    """vLLM's order: logit_bias (additive), then transformers' repetition penalty over prompt + output,
    then OpenAI presence/frequency penalties over the output tokens."""
    from transformers import RepetitionPenaltyLogitsProcessor

    x = logits.clone().float()[None, :]
    for tok, b in (logit_bias or {}).items():
        x[0, tok] += b
    ids = list(prompt) + list(output)
    if rep != 1.0 and ids:
        x = RepetitionPenaltyLogitsProcessor(penalty=rep)(torch.tensor([ids]), x)
    x = x[0]
    counts = torch.zeros_like(x)
    for t in output:
        counts[t] += 1
    return x - counts * frequency - (counts > 0).float() * presence


PENALTY_CASES = [
    dict(rep=1.5),
    dict(rep=0.7),  # < 1 rewards repetition
    dict(presence=0.8),
    dict(frequency=0.6),
    dict(presence=-0.5, frequency=-0.3),
    dict(rep=1.3, presence=0.5, frequency=0.4),
    dict(logit_bias={0: 5.0, 9: -3.5, 40: 100.0}),
    dict(rep=1.8, presence=1.0, frequency=2.0, logit_bias={5: 2.5, 11: -1.0, 13: 4.0}),
]


def test_penalties_and_logit_bias_match_reference():
    """Sampler.process on a batch of rows with different penalties equals the reference for each row;
    tokens only in the prompt get the repetition penalty but no presence/frequency penalty."""
    vocab = 48
    g = torch.Generator().manual_seed(0)
    prompt = [5, 9, 13, 13, 21, 30]
    output = [13, 2, 17, 17, 17, 40, 0, 9]
    base = torch.randn(len(PENALTY_CASES) + 1, vocab, generator=g) * 3.0  # positive and negative logits
    reqs, expected = [], []
    for i, case in enumerate(PENALTY_CASES):
        sp = SamplingParams(repetition_penalty=case.get("rep", 1.0), presence_penalty=case.get("presence", 0.0),
                            frequency_penalty=case.get("frequency", 0.0), logit_bias=case.get("logit_bias"))
        reqs.append(make_request(sp, prompt=prompt, output=output, rid=f"r{i}"))
        expected.append(reference_processed_logits(base[i], prompt, output, case.get("rep", 1.0),
                                                   case.get("presence", 0.0), case.get("frequency", 0.0),
                                                   case.get("logit_bias")))
    # A plain row in the same batch must be untouched.
    reqs.append(make_request(SamplingParams(), prompt=prompt, output=output, rid="plain"))
    expected.append(base[-1].clone())
    st = sampling_tensors(reqs, vocab)
    got = Sampler.process(base.clone(), st)
    for i, (case, exp) in enumerate(zip(PENALTY_CASES + ["plain row"], expected)):
        diff = (got[i] - exp).abs()
        assert torch.allclose(got[i], exp, atol=1e-5, rtol=1e-6), (
            f"case {case}: max |diff| {float(diff.max()):.3g} at token {int(diff.argmax())} "
            f"(got {float(got[i, diff.argmax()]):.5f}, expected {float(exp[diff.argmax()]):.5f})")


def test_apply_penalties_without_output():
    """At the first step (no output yet) only the repetition penalty acts, over the prompt."""
    vocab = 20
    logits = torch.linspace(-4, 4, vocab)
    prompt = [0, 3, 10, 19]
    sp = SamplingParams(repetition_penalty=2.0, presence_penalty=1.5, frequency_penalty=1.5)
    st = sampling_tensors([make_request(sp, prompt=prompt)], vocab)
    got = apply_penalties(logits[None].clone(), st.penalties)[0]
    exp = reference_processed_logits(logits, prompt, [], rep=2.0, presence=1.5, frequency=1.5)
    assert torch.allclose(got, exp, atol=1e-6), (got, exp)


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    vocab = 32
    sp = SamplingParams(min_tokens=3, stop_token_ids=[7, 9])
    reqs = [make_request(sp, output=[4] * k, rid=f"r{k}") for k in range(5)]
    reqs.append(make_request(SamplingParams(min_tokens=3, stop_token_ids=[7], ignore_eos=True), rid="ign"))
    st = sampling_tensors(reqs, vocab)
    logits = Sampler.process(torch.zeros(len(reqs), vocab), st)
    for k in range(5):
        banned = torch.isinf(logits[k]).nonzero().flatten().tolist()
        assert banned == ([EOS, 7, 9] if k < 3 else []), f"{k} output tokens: banned {banned}"
    # With ignore_eos, EOS is an ordinary token; only the stop ids are banned.
    assert torch.isinf(logits[-1]).nonzero().flatten().tolist() == [7]


# =========================================================================== fixtures for end-to-end tests

@pytest.fixture(scope="module")
def stories_llm(stories_dir):
    """One stories260k engine for the module; prefix caching OFF so n>1 sharing must come from forking."""
    from conftest import LLM_DEFAULTS, _limit_threads
    from freight import LLM

    llm = LLM(model=str(stories_dir), **dict(LLM_DEFAULTS, enable_prefix_caching=False))
    _limit_threads()
    return llm


def gen(llm, prompt, params, **kw):
    return llm.generate(prompt, params, use_tqdm=False, **kw)


def greedy_pieces(llm, prompt: str, n: int):
    """Greedy tokens of stories260k after `prompt` and the text each one adds (streamed without stops)."""
    engine = llm.llm_engine
    engine.add_request("pieces", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    pieces, tokens = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "pieces":
                tokens.extend(out.delta_token_ids[0])
                pieces.append(out.delta_text[0])
    assert len(tokens) == n == len(pieces), "premise: one output per step, one token each"
    # The streamed text is the tokenizer's own decoding of the continuation.
    tok = llm.get_tokenizer()
    prompt_ids = tok(prompt).input_ids
    assert "".join(pieces) == tok.decode(prompt_ids + tokens)[len(tok.decode(prompt_ids)):]
    return tokens, pieces


def stream(engine, request_id, prompt, params):
    """Drive the engine step by step; returns the list of (delta_text, output) of this request."""
    engine.add_request(request_id, prompt, params)
    events = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                events.append((out.delta_text[0], out))
    return events


# =========================================================================== stops

def _spanning_stop(pieces: list[str]):
    """A stop string that starts inside one token's text (not at its first character), covers the whole
    next token, and ends inside a later token (not at its last character).

    Returns (stop, char offset of the stop in the text, first token index, last token index)."""
    starts = np.cumsum([0] + [len(p) for p in pieces])
    text = "".join(pieces)
    for i in range(2, len(pieces)):
        if len(pieces[i]) < 4:
            continue
        for j in (i + 2, i + 3):
            if j < len(pieces) and len(pieces[j]) >= 3:
                a, b = starts[i] + 2, starts[j] + 2
                stop = text[a:b]
                if text.find(stop) == a:
                    return stop, int(a), i, j
    raise AssertionError(f"premise: no token-spanning stop string found in {pieces}")


def test_stop_string_spanning_tokens(stories_llm):
    prompt = "Once upon a time"
    _, pieces = greedy_pieces(stories_llm, prompt, 40)
    full = "".join(pieces)
    stop, at, i, j = _spanning_stop(pieces)

    c = gen(stories_llm, prompt, SamplingParams(temperature=0, max_tokens=40, stop=stop))[0].outputs[0]
    assert c.text == full[:at], f"stop {stop!r}: text {c.text!r}, expected {full[:at]!r}"
    assert c.finish_reason == "stop" and c.stop_reason == stop, (c.finish_reason, c.stop_reason)
    assert len(c.token_ids) == j + 1, "generation should end at the token that completed the stop string"

    c = gen(stories_llm, prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop],
                                                include_stop_str_in_output=True))[0].outputs[0]
    assert c.text == full[:at + len(stop)], c.text
    assert c.finish_reason == "stop" and c.stop_reason == stop

    # Of several stop strings, the earliest occurrence in the text wins, whatever the list order.
    later = full[at + len(stop):at + len(stop) + 4]
    if later.strip():
        c = gen(stories_llm, prompt, SamplingParams(temperature=0, max_tokens=40,
                                                    stop=[later, stop + later]))[0].outputs[0]
        assert c.text == full[:at] and c.stop_reason == stop + later, (c.text, c.stop_reason)


@pytest.mark.parametrize("include", [False, True])
def test_streaming_never_leaks_stop_string(stories_llm, include):
    """Step-by-step deltas: the streamed prefix is always a prefix of the final text (so no character of
    the stop string is ever sent, unless it is to be included), and the deltas add up to it exactly."""
    prompt = "Once upon a time"
    _, pieces = greedy_pieces(stories_llm, prompt, 40)
    full = "".join(pieces)
    stop, at, _, _ = _spanning_stop(pieces)
    expected = full[:at + len(stop)] if include else full[:at]
    params = SamplingParams(temperature=0, max_tokens=40, stop=[stop], include_stop_str_in_output=include)
    events = stream(stories_llm.llm_engine, f"stream-{include}", prompt, params)
    streamed = ""
    for delta, out in events:
        streamed += delta
        assert expected.startswith(streamed), (
            f"streamed {streamed!r} is not a prefix of the final text {expected!r} (stop {stop!r})")
        if not include:
            assert len(streamed) <= at, f"streamed past the stop string's start: {streamed!r}"
    final = events[-1][1]
    assert final.finished and final.outputs[0].text == expected == streamed, (streamed, final.outputs[0].text)
    assert final.outputs[0].finish_reason == "stop" and final.outputs[0].stop_reason == stop
    assert sum(1 for d, _ in events if d) >= 3, "premise: text was streamed incrementally"


def test_streaming_holdback_released_when_stop_never_matches(stories_llm):
    """A stop string whose prefix appears but which never completes: held-back text is released, and at
    the end the deltas add up to the whole greedy text (finish_reason 'length')."""
    prompt = "Once upon a time"
    _, pieces = greedy_pieces(stories_llm, prompt, 30)
    full = "".join(pieces)
    stop, at, _, _ = _spanning_stop(pieces)
    near_miss = stop + "\u2603"  # same prefix, never completes
    events = stream(stories_llm.llm_engine, "nearmiss", prompt,
                    SamplingParams(temperature=0, max_tokens=30, stop=[near_miss]))
    streamed = ""
    for delta, _ in events:
        streamed += delta
        assert full.startswith(streamed)
    final = events[-1][1].outputs[0]
    assert streamed == final.text == full, (streamed, full)
    assert final.finish_reason == "length" and final.stop_reason is None


def test_stop_token_ids(stories_llm):
    prompt = "Once upon a time"
    tokens, pieces = greedy_pieces(stories_llm, prompt, 30)
    k = next(i for i in range(3, 30) if tokens[i] not in tokens[:i] and tokens[i] != EOS)
    stop_id = tokens[k]
    c = gen(stories_llm, prompt, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id]))[0].outputs[0]
    assert c.token_ids == tokens[:k + 1], "ends at (and keeps) the first occurrence of the stop id"
    assert c.finish_reason == "stop" and c.stop_reason == stop_id


def test_stop_token_text_excluded_unless_include_stop_str(stories_llm):
    """As in vLLM: the text of the token that stopped the sequence (stop_token_ids) is not part of
    the output text unless include_stop_str_in_output=True (token_ids keep it either way)."""
    prompt = "Once upon a time"
    tokens, pieces = greedy_pieces(stories_llm, prompt, 30)
    k = next(i for i in range(3, 30) if tokens[i] not in tokens[:i] and pieces[i].strip())
    stop_id = tokens[k]
    c = gen(stories_llm, prompt, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id]))[0].outputs[0]
    assert c.token_ids == tokens[:k + 1]
    assert c.text == "".join(pieces[:k]), f"text {c.text!r} should not include the stop token's {pieces[k]!r}"
    c = gen(stories_llm, prompt, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id],
                                                include_stop_str_in_output=True))[0].outputs[0]
    assert c.text == "".join(pieces[:k + 1]), c.text


def test_eos_ignore_eos_and_length(stories_llm):
    prompt = "Once upon a time"
    push_eos = {EOS: 100.0}  # make EOS the certain next token
    c = gen(stories_llm, prompt, SamplingParams(temperature=0, max_tokens=5, logit_bias=push_eos))[0].outputs[0]
    assert c.token_ids == [EOS] and c.finish_reason == "stop" and c.stop_reason is None, c
    assert c.text == ""
    c = gen(stories_llm, prompt, SamplingParams(temperature=0, max_tokens=5, logit_bias=push_eos,
                                                ignore_eos=True))[0].outputs[0]
    assert c.token_ids == [EOS] * 5 and c.finish_reason == "length" and c.stop_reason is None, c
    c = gen(stories_llm, prompt, SamplingParams(temperature=0.8, seed=1, max_tokens=7, ignore_eos=True))[0].outputs[0]
    assert len(c.token_ids) == 7 and c.finish_reason == "length"


def test_min_tokens_end_to_end(stories_llm):
    """min_tokens: EOS and stop_token_ids cannot be sampled before that many tokens, even when they
    would otherwise be certain; right after, they stop the sequence."""
    prompt = "Once upon a time"
    for min_tokens in (0, 1, 4):
        c = gen(stories_llm, prompt, SamplingParams(temperature=0, max_tokens=10, min_tokens=min_tokens,
                                                    logit_bias={EOS: 100.0}))[0].outputs[0]
        assert len(c.token_ids) == min_tokens + 1 and c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1], (
            min_tokens, c.token_ids)
        assert c.finish_reason == "stop"
    tokens, _ = greedy_pieces(stories_llm, prompt, 8)
    stop_id = tokens[0]
    c = gen(stories_llm, prompt, SamplingParams(temperature=0, max_tokens=10, min_tokens=3,
                                                stop_token_ids=[stop_id], logit_bias={stop_id: 100.0}))[0].outputs[0]
    assert len(c.token_ids) == 4 and c.token_ids[-1] == stop_id and stop_id not in c.token_ids[:-1], c.token_ids
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    # Sampling (not greedy) rows honour the ban too.
    c = gen(stories_llm, prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=10, min_tokens=6,
                                                logit_bias={EOS: 8.0}))[0].outputs[0]
    assert EOS not in c.token_ids[:6] and len(c.token_ids) >= 6, c.token_ids


def test_stop_string_ignored_within_min_tokens(stories_llm):
    """A stop string completed inside the first min_tokens tokens does not stop the sequence; its next
    occurrence after min_tokens does."""
    prompt = "Once upon a time"
    tokens, pieces = greedy_pieces(stories_llm, prompt, 40)
    full = "".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])
    first = full.find(".")
    second = full.find(".", first + 1)
    assert 0 < first < second, "premise: two sentences in the greedy text"
    k_first = int(np.searchsorted(ends, first + 1))  # index of the token that completes the first "."
    c = gen(stories_llm, prompt, SamplingParams(temperature=0, max_tokens=40, stop=".",
                                                min_tokens=k_first + 2))[0].outputs[0]
    assert c.text == full[:second] and c.stop_reason == "." and c.finish_reason == "stop", c.text
    c = gen(stories_llm, prompt, SamplingParams(temperature=0, max_tokens=40, stop="."))[0].outputs[0]
    assert c.text == full[:first]


# =========================================================================== seeds

def _mixed_requests(tok):
    ids = tok(STORY).input_ids
    rng = random.Random(0)
    seeded = [
        SamplingParams(temperature=1.0, seed=11, max_tokens=16),
        SamplingParams(temperature=0.7, seed=12, max_tokens=16),
        SamplingParams(temperature=1.3, top_p=0.9, seed=13, max_tokens=16),
        SamplingParams(temperature=1.0, top_k=20, seed=14, max_tokens=16),
        SamplingParams(temperature=0.9, min_p=0.05, seed=15, max_tokens=16),
        SamplingParams(temperature=1.0, top_k=30, top_p=0.8, seed=16, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.4, seed=17, max_tokens=16),
        SamplingParams(temperature=1.1, seed=18, max_tokens=12, logprobs=2),
        SamplingParams(temperature=1.0, seed=19, max_tokens=16, n=2),
        SamplingParams(temperature=0.8, seed=20, max_tokens=9, logit_bias={EOS: -100.0}),
    ]
    others = []
    for i in range(32 - len(seeded)):
        kind = i % 4
        if kind == 0:
            others.append(SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 20)))
        elif kind == 1:
            others.append(SamplingParams(temperature=1.0, max_tokens=rng.randint(4, 20)))
        elif kind == 2:
            others.append(SamplingParams(temperature=0.6, top_p=0.7, max_tokens=rng.randint(4, 20)))
        else:
            others.append(SamplingParams(temperature=1.5, top_k=5, max_tokens=rng.randint(4, 20), n=2))
    reqs = []
    for j, sp in enumerate(seeded + others):
        start = rng.randint(0, 100)
        length = rng.choice([1, 3, 7, 16, 17, 33, 60])
        reqs.append(({"prompt_token_ids": ids[start:start + length]}, sp, j < len(seeded)))
    rng.shuffle(reqs)
    return reqs


def test_seeded_requests_identical_alone_and_in_mixed_batch(stories_llm):
    reqs = _mixed_requests(stories_llm.get_tokenizer())
    assert len(reqs) == 32
    seeded = [(p, sp) for p, sp, s in reqs if s]
    alone = [gen(stories_llm, p, sp)[0] for p, sp in seeded]

    def seeded_of(outs):
        return [o for o, (_, _, s) in zip(outs, reqs) if s]

    batch = seeded_of(gen(stories_llm, [p for p, _, _ in reqs], [sp for _, sp, _ in reqs]))
    rev = list(reversed(reqs))
    batch_rev = list(reversed([o for o, (_, _, s) in zip(gen(stories_llm, [p for p, _, _ in rev],
                                                             [sp for _, sp, _ in rev]), rev) if s]))
    for (p, sp), a, b, c in zip(seeded, alone, batch, batch_rev):
        for x in (b, c):
            got = [o.token_ids for o in x.outputs]
            want = [o.token_ids for o in a.outputs]
            assert got == want, f"seed {sp.seed} ({sp}): alone {want} vs in batch {got}"
            assert [o.text for o in x.outputs] == [o.text for o in a.outputs]
    # Premise: seeded sampling is not secretly greedy.
    distinct = {tuple(a.outputs[0].token_ids) for a in alone}
    assert len(distinct) == len(alone)


def test_same_seed_same_output_different_seed_differs(stories_llm):
    sp = SamplingParams(temperature=1.0, seed=123, max_tokens=20, ignore_eos=True)
    a = gen(stories_llm, "Once upon a time", sp)[0].outputs[0].token_ids
    b = gen(stories_llm, "Once upon a time", sp)[0].outputs[0].token_ids
    c = gen(stories_llm, "Once upon a time", SamplingParams(temperature=1.0, seed=124, max_tokens=20,
                                                            ignore_eos=True))[0].outputs[0].token_ids
    assert a == b
    assert a != c


# =========================================================================== n and best_of

def _story_prompt(llm, n_tokens):
    ids = llm.get_tokenizer()(STORY).input_ids
    assert len(ids) >= n_tokens, "premise: the story is long enough"
    return {"prompt_token_ids": ids[:n_tokens]}


def test_n4_shares_prompt_blocks_by_forking(stories_llm):
    """n=4 on a 200-token prompt (prefix caching off, block size 16): the prompt is computed once and
    its 12 full blocks are allocated once; each sequence gets its own copy of the partial 13th block
    (copy-on-write) and its own decode blocks."""
    engine = stories_llm.llm_engine
    assert engine.config.block_size == 16 and not engine.config.enable_prefix_caching
    prompt = _story_prompt(stories_llm, 200)
    full_blocks = 200 // 16

    def run(sp):
        s0 = engine.get_stats()
        out = gen(stories_llm, prompt, sp)[0]
        s1 = engine.get_stats()
        return (out, s1.num_allocated_blocks - s0.num_allocated_blocks,
                s1.num_computed_prompt_tokens - s0.num_computed_prompt_tokens)

    params = dict(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True, logprobs=0)
    o1, alloc1, computed1 = run(SamplingParams(n=1, **params))
    o4, alloc4, computed4 = run(SamplingParams(n=4, **params))
    assert computed1 == computed4 == 200, f"prompt tokens computed: n=1 {computed1}, n=4 {computed4}"
    assert alloc1 == math.ceil((200 + 24 - 1) / 16), alloc1
    assert alloc4 == full_blocks + 4 * (alloc1 - full_blocks), (
        f"n=4 allocated {alloc4} blocks; expected the {full_blocks} full prompt blocks once plus "
        f"{alloc1 - full_blocks} per sequence ({full_blocks + 4 * (alloc1 - full_blocks)}), "
        f"n=1 allocated {alloc1}; without sharing it would be {4 * alloc1}")
    assert alloc4 < 2 * math.ceil(200 / 16)

    tok = stories_llm.get_tokenizer()
    prompt_text = tok.decode(prompt["prompt_token_ids"])
    assert sorted(c.index for c in o4.outputs) == [0, 1, 2, 3]
    for c in o4.outputs:
        assert len(c.token_ids) == 24 and c.finish_reason == "length"
        assert all(0 <= t < 512 for t in c.token_ids)
        assert c.text == tok.decode(prompt["prompt_token_ids"] + c.token_ids)[len(prompt_text):], c.text
        assert abs(c.cumulative_logprob - sum(d[t] for d, t in zip(c.logprobs, c.token_ids))) < 1e-6
    assert len({tuple(c.token_ids) for c in o4.outputs}) == 4, "seeded samples should differ"
    # Sample 0 uses the request's seed itself (as vLLM: sample i gets seed + i).
    assert o4.outputs[0].token_ids == o1.outputs[0].token_ids
    assert engine.get_stats().kv_cache_usage == 0.0, "all blocks are freed at the end"


def test_best_of_returns_best_n(stories_llm):
    """best_of=6, n=2 returns 2 outputs sorted by cumulative logprob, and they are the 2 best of the
    same 6 samples (n=6 with the same seed draws the very same 6 sequences)."""
    prompt = "Lily and Tom"
    common = dict(temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    best = gen(stories_llm, prompt, SamplingParams(n=2, best_of=6, **common))[0]
    all6 = gen(stories_llm, prompt, SamplingParams(n=6, **common))[0]
    assert len(best.outputs) == 2 and len(all6.outputs) == 6
    cum = [c.cumulative_logprob for c in best.outputs]
    assert cum == sorted(cum, reverse=True), cum
    assert [c.index for c in best.outputs] == [0, 1]
    ranked = sorted(all6.outputs, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked[:2]]
    assert len({tuple(c.token_ids) for c in all6.outputs}) == 6


def test_n_greedy_and_streaming_deltas_per_sequence(stories_llm):
    """n=3 streamed: each sequence's deltas add up to its final text."""
    engine = stories_llm.llm_engine
    events = stream(engine, "n3", "Once upon a time",
                    SamplingParams(n=3, temperature=1.0, seed=9, max_tokens=12, ignore_eos=True))
    texts = ["", "", ""]
    for _, out in events:
        for c, d in zip(out.outputs, out.delta_text):
            texts[c.index] += d
    final = events[-1][1]
    assert final.finished
    assert texts == [c.text for c in sorted(final.outputs, key=lambda c: c.index)]


# =========================================================================== logprobs vs transformers

@pytest.fixture(scope="module")
def random_llm(random_model):
    """A random-weight Llama (tests/model_factory.py) with 16-token prefill chunks."""
    from conftest import LLM_DEFAULTS, _limit_threads
    from freight import LLM

    d = random_model("llama_gqa")
    llm = LLM(model=str(d), **dict(LLM_DEFAULTS, max_num_batched_tokens=16))  # prompts prefill in chunks
    _limit_threads()
    return d, llm


def _hf_logprobs(model_dir, ids) -> torch.Tensor:
    from hf_reference import load_hf

    with torch.no_grad():
        logits = load_hf(str(model_dir))(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_top_logprobs_and_prompt_logprobs_match_hf(random_llm):
    d, llm = random_llm
    g = random.Random(3)
    prompt = [1] + [g.randrange(3, 512) for _ in range(39)]  # 40 tokens: 3 prefill chunks of 16
    k = 5
    o = gen(llm, {"prompt_token_ids": prompt},
            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=k, prompt_logprobs=k))[0]
    c = o.outputs[0]
    lp = _hf_logprobs(d, prompt + c.token_ids)
    P = len(prompt)
    assert len(c.logprobs) == len(c.token_ids) == 8
    for i, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        row = lp[P - 1 + i]
        assert tok == int(row.argmax()), f"step {i}: greedy token {tok} vs HF argmax {int(row.argmax())}"
        top = torch.topk(row, k)
        assert set(entry) == set(top.indices.tolist()), f"step {i}: ids {sorted(entry)} vs HF {top.indices.tolist()}"
        for t, v in entry.items():
            assert abs(v - float(row[t])) < 1e-4, f"step {i} token {t}: {v} vs HF {float(row[t])}"
    assert abs(c.cumulative_logprob - sum(float(lp[P - 1 + i, t]) for i, t in enumerate(c.token_ids))) < 1e-3

    assert o.prompt_logprobs is not None and len(o.prompt_logprobs) == P
    assert o.prompt_logprobs[0] is None
    for i in range(1, P):
        entry = o.prompt_logprobs[i]
        row = lp[i - 1]
        assert prompt[i] in entry, f"position {i}: prompt token missing"
        want = set(torch.topk(row, k).indices.tolist()) | {prompt[i]}
        assert set(entry) == want, f"position {i}: ids {sorted(entry)} vs {sorted(want)}"
        for t, v in entry.items():
            assert abs(v - float(row[t])) < 1e-4, f"position {i} token {t}: {v} vs HF {float(row[t])}"


def test_sampled_token_outside_top_k_logprobs(random_llm):
    """When the sampled token is not among the top-k, its entry is added (k+1 entries), and all values
    are the raw model log-softmax (not the temperature-scaled one)."""
    d, llm = random_llm
    prompt = [1, 40, 41, 42, 43]
    c = gen(llm, {"prompt_token_ids": prompt},
            SamplingParams(temperature=3.0, seed=1, max_tokens=12, ignore_eos=True, logprobs=1))[0].outputs[0]
    lp = _hf_logprobs(d, prompt + c.token_ids)
    saw_outside = False
    for i, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        row = lp[len(prompt) - 1 + i]
        top1 = int(row.argmax())
        assert set(entry) == {tok, top1}, (i, entry, tok, top1)
        saw_outside |= tok != top1
        for t, v in entry.items():
            assert abs(v - float(row[t])) < 1e-4, f"step {i} token {t}: {v} vs HF {float(row[t])}"
    assert saw_outside, "premise: at temperature 3 some sampled token is not the argmax"


def test_penalized_greedy_matches_hf_loop(random_llm):
    """Greedy decoding with repetition/presence/frequency penalties and logit_bias equals a
    transformers loop applying the reference processing to its own logits at each step."""
    from hf_reference import load_hf

    d, llm = random_llm
    prompt = [1, 50, 60, 70, 50, 60, 80, 90]
    cfg = dict(rep=1.4, presence=0.6, frequency=0.5, logit_bias={100: 3.0, 60: 2.0, 200: -2.0})
    n = 16
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, repetition_penalty=cfg["rep"],
                        presence_penalty=cfg["presence"], frequency_penalty=cfg["frequency"],
                        logit_bias=cfg["logit_bias"], logprobs=0)
    c = gen(llm, {"prompt_token_ids": prompt}, sp)[0].outputs[0]
    got = c.token_ids
    plain = gen(llm, {"prompt_token_ids": prompt},
                SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0].outputs[0].token_ids
    model = load_hf(str(d))
    out, raw_lps = [], []
    with torch.no_grad():
        for step in range(n):
            logits = model(input_ids=torch.tensor([prompt + out])).logits[0, -1].float()
            x = reference_processed_logits(logits, prompt, out, **cfg)
            top2 = torch.topk(x, 2).values
            assert float(top2[0] - top2[1]) > 1e-3, f"premise: no near tie at step {step}"
            out.append(int(x.argmax()))
            raw_lps.append(float(torch.log_softmax(logits, dim=-1)[out[-1]]))
    assert got == out, f"engine {got} vs reference {out}"
    assert got != plain, "premise: the penalties change the greedy output"
    # Logprobs are those of the raw model distribution (vLLM's default), not of the penalised logits.
    for i, (t, entry, want) in enumerate(zip(got, c.logprobs, raw_lps)):
        assert abs(entry[t] - want) < 1e-4, f"step {i}: logprob {entry[t]} vs raw model log_softmax {want}"


# =========================================================================== validation

INVALID = [
    (dict(n=0), "n"),
    (dict(n=1.5), "n"),
    (dict(n=True), "n"),
    (dict(n=3, best_of=2), "best_of"),
    (dict(best_of=0), "best_of"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),  # -inf / inf = NaN
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(max_tokens=4.0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=10, max_tokens=5), "min_tokens"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=-2), "prompt_logprobs"),
    (dict(seed=1.5), "seed"),
    # Generators take 64-bit seeds; sample i of an n > 1 request uses seed + i.
    (dict(seed=2**64), "seed"),
    (dict(seed=-2**63 - 1), "seed"),
    (dict(seed=2**64 - 1, n=2), "seed"),
    (dict(stop=""), "stop"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids"),
    (dict(logit_bias={5: 101.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={5: float("nan")}), "logit_bias"),
]

# Wrong types (as a JSON body or a careless caller might send): still a SamplingParamsError naming the field.
INVALID_TYPES = [
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=None), "top_p"),
    (dict(stop=5), "stop"),
    (dict(stop_token_ids=["a"]), "stop_token_ids"),
    (dict(logit_bias={"x": 1.0}), "logit_bias"),
]


def _check_invalid(kwargs, param):
    with pytest.raises(SamplingParamsError) as exc:
        SamplingParams(**kwargs)
    assert isinstance(exc.value, ValueError)
    assert exc.value.param == param, f"{kwargs}: param {exc.value.param!r}, expected {param!r}"
    assert param in str(exc.value), f"message {str(exc.value)!r} does not name {param!r}"


@pytest.mark.parametrize("kwargs,param", INVALID, ids=lambda v: repr(v))
def test_invalid_sampling_params_raise(kwargs, param):
    _check_invalid(kwargs, param)


@pytest.mark.parametrize("kwargs,param", INVALID_TYPES, ids=lambda v: repr(v))
def test_wrongly_typed_sampling_params_raise(kwargs, param):
    _check_invalid(kwargs, param)


def test_valid_sampling_params_normalised():
    sp = SamplingParams(top_k=-1, stop="x", logit_bias={"5": 1}, temperature=0.0, best_of=2, n=2,
                        presence_penalty=-2.0, frequency_penalty=2.0, min_p=1.0, top_p=1.0)
    assert sp.top_k == 0 and sp.stop == ["x"] and sp.logit_bias == {5: 1.0} and sp.greedy
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(min_tokens=5, max_tokens=5).min_tokens == 5


def test_too_many_logprobs_rejected_without_breaking_the_batch(make_llm, stories_dir):
    """logprobs / prompt_logprobs larger than the vocabulary (512) must be refused up front with a
    ValueError naming the field (as vLLM's max_logprobs check does), not crash the engine step that
    also serves other requests."""
    for bad in (dict(logprobs=1000), dict(prompt_logprobs=1000)):
        llm = make_llm(stories_dir)
        engine = llm.llm_engine
        engine.add_request("bystander", "Once upon a time", SamplingParams(temperature=0, max_tokens=4))
        with pytest.raises(ValueError, match="logprobs"):
            engine.add_request("bad", "Lily", SamplingParams(temperature=0, max_tokens=4, **bad))
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        assert set(done) == {"bystander"} and len(done["bystander"].outputs[0].token_ids) == 4
        with pytest.raises(ValueError, match="logprobs"):
            llm.generate("Lily", SamplingParams(temperature=0, max_tokens=4, **bad), use_tqdm=False)
