"""Engine-core correctness: freight's greedy output must equal transformers' token for token.

Every test here runs freight.LLM in float32 on CPU and compares with
`hf_reference.hf_greedy` (transformers' own forward pass, greedy, EOS disabled).
On a mismatch the message says at which step the outputs diverge and what the
reference's top-2 logit gap was there: a gap below hf_reference.NEAR_TIE (1e-3)
is a numerical near-tie, anything larger is an engine bug.

Covered: the real trained stories260k Llama and seeded random Llama / Mistral /
Qwen2 / Qwen3 checkpoints (GQA, MQA, tied/untied embeddings, QKV bias, q/k norm,
llama3 and linear RoPE scaling, explicit head_dim); many prompt lengths in one
batch; small prefill chunks; a KV cache small enough to force preemption; prefix
caching on/off and its reuse counters; logprobs; over-long prompts; the CLI.
"""

from __future__ import annotations

import inspect
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_reference import Reference, assert_same_tokens, describe_divergence, hf_greedy
from model_factory import VARIANTS, kv_bytes_per_block

pytestmark = pytest.mark.timeout(300)

# A TinyStories-style text: prompts for stories260k are slices of its tokens.
STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she saw a big red ball under a tree. She wanted to play with it, but it was too high. "
    "Lily asked her mom for help. Her mom smiled and said, \"Let's get it together.\" They found a long stick "
    "and pushed the ball down. Lily was very happy. She played with the ball all day long.\n"
    "The next day, Tom came to the park. Tom was a boy who liked to run and jump. He saw Lily and her ball and "
    "said, \"Can I play too?\" Lily said, \"Yes, we can share.\" They threw the ball to each other and "
    "laughed. Then the sky became dark and it started to rain. Lily and Tom ran to the house. They sat by the "
    "window and watched the rain. Mom gave them warm milk and a big cake. They ate the cake and talked about "
    "the ball, the dog, the bird and the sun. When the rain stopped, they went outside again. The grass was "
    "wet and shiny. A little bird sang a song in the tree. Lily said, \"I love the park. It is the best place "
    "in the world.\" Tom nodded and smiled. They were best friends forever.\n"
    "One sunny morning, a small cat named Kitty wanted to find a friend. She walked to the river and saw a "
    "fish. \"Hello, fish,\" she said. \"Do you want to be my friend?\" The fish jumped out of the water and "
    "said, \"Yes, but I cannot walk.\" Kitty thought for a moment. Then she had an idea. She found a boat "
    "and they went on the river together. They saw a big castle, a tall tree and a funny frog. At the end of "
    "the day, Kitty went home. She was tired but happy, because now she had a new friend."
)

STORY_PROMPTS = ["Once upon a time", "Lily and Tom", "The little dog", "One day, a big bear", "Tim"]


# --------------------------------------------------------------------------- helpers

_REF_CACHE: dict[tuple[str, tuple[int, ...]], Reference] = {}


def ref(model_dir, prompt_ids, n: int) -> Reference:
    """hf_greedy with a per-session cache (a longer cached run serves shorter requests)."""
    key = (str(model_dir), tuple(prompt_ids))
    r = _REF_CACHE.get(key)
    if r is None or len(r.tokens) < n:
        r = hf_greedy(model_dir, list(prompt_ids), n)
        _REF_CACHE[key] = r
    if len(r.tokens) == n:
        return r
    return Reference(prompt_ids=r.prompt_ids, tokens=r.tokens[:n], logits=r.logits[:n],
                     logprobs=r.logprobs[:n], gaps=r.gaps[:n])


def greedy(n: int, **kw):
    from freight import SamplingParams

    return SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=n, ignore_eos=True, **kw)


def generate(llm, prompts, params):
    """llm.generate without a progress bar when the engine supports turning it off."""
    try:
        sig = inspect.signature(llm.generate)
        if "use_tqdm" in sig.parameters:
            return llm.generate(prompts, params, use_tqdm=False)
    except (TypeError, ValueError):
        pass
    return llm.generate(prompts, params)


def as_inputs(prompt_ids_list):
    return [{"prompt_token_ids": list(p)} for p in prompt_ids_list]


def check_outputs(model_dir, prompt_ids_list, outs, n: int, label: str = "") -> None:
    """Each output equals the HF greedy reference; collects every mismatch into one failure."""
    assert len(outs) == len(prompt_ids_list), f"{label}: got {len(outs)} outputs for {len(prompt_ids_list)} prompts"
    problems = []
    for i, (p, o) in enumerate(zip(prompt_ids_list, outs)):
        assert list(o.prompt_token_ids) == list(p), (
            f"{label}: output {i} is for another prompt (outputs out of order?): "
            f"prompt_token_ids {list(o.prompt_token_ids)[:10]}... != {list(p)[:10]}...")
        got = list(o.outputs[0].token_ids)
        r = ref(model_dir, p, n)
        msg = describe_divergence(r, got, f"{label} prompt#{i} (len {len(p)})")
        if msg:
            problems.append(msg)
        elif o.outputs[0].finish_reason != "length":
            problems.append(f"{label} prompt#{i}: finish_reason {o.outputs[0].finish_reason!r}, expected 'length'")
    assert not problems, f"{len(problems)}/{len(outs)} outputs differ from HF:\n" + "\n".join(problems)


def continuation_text(tok, prompt_ids, gen_ids) -> str:
    """The text the generated tokens add after the prompt (as vLLM reports it: a sentencepiece
    word-start space is kept, since the text continues the prompt)."""
    pre = tok.decode(list(prompt_ids), skip_special_tokens=True)
    full = tok.decode(list(prompt_ids) + list(gen_ids), skip_special_tokens=True)
    assert full.startswith(pre), (pre, full)
    return full[len(pre):]


def stats(llm):
    return llm.llm_engine.get_stats()


def story_ids(tokenizer) -> list[int]:
    """BOS + the tokens of STORY (no BOS inside)."""
    ids = tokenizer(STORY, add_special_tokens=False).input_ids
    return [1] + list(ids)


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def vocab_of(model_dir) -> int:
    import json

    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def stories_tok(stories_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(stories_dir))


# --------------------------------------------------------------------------- stories260k

def test_stories_greedy_from_bos_200(make_llm, stories_dir, stories_tok):
    """The documented llama2.c greedy story: 200 tokens from BOS alone."""
    llm = make_llm(stories_dir)
    outs = generate(llm, [{"prompt_token_ids": [1]}], greedy(200))
    check_outputs(stories_dir, [[1]], outs, 200, "stories BOS")
    text = outs[0].outputs[0].text
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text[:200]
    assert text == stories_tok.decode(outs[0].outputs[0].token_ids, skip_special_tokens=True)


def test_stories_greedy_text_prompts(make_llm, stories_dir, stories_tok):
    """Several text prompts in one batch, 200 tokens each; tokenization as the HF tokenizer (BOS added)."""
    llm = make_llm(stories_dir)
    outs = generate(llm, STORY_PROMPTS, greedy(200))
    ids = [stories_tok(p).input_ids for p in STORY_PROMPTS]
    for p, o, i in zip(STORY_PROMPTS, outs, ids):
        assert o.prompt == p
        assert list(o.prompt_token_ids) == i, f"tokenization of {p!r}: {o.prompt_token_ids} != HF {i}"
    check_outputs(stories_dir, ids, outs, 200, "stories text prompts")
    for o in outs:
        assert o.outputs[0].text == continuation_text(stories_tok, o.prompt_token_ids, o.outputs[0].token_ids)


@pytest.mark.parametrize("variant", ["llama_gqa", "mistral_swa", "qwen3_qknorm"])
def test_portable_attention_paths_match_hf(make_llm, random_model, monkeypatch, variant):
    """The paths CUDA (and a CPU without a C compiler) runs: gathered-block decode attention,
    SDPA prefill, PyTorch norm/rotary/activation and unpacked weights. Same greedy tokens as transformers."""
    import freight.layers.attention as attention
    import freight.layers.norm as norm
    import freight.layers.rotary as rotary
    import freight.models.llama as llama

    monkeypatch.setattr(attention, "paged_decode_available", lambda q: False)
    monkeypatch.setattr(attention, "paged_prefill_available", lambda q, k_cache: False)
    monkeypatch.setattr(norm, "rms_norm", lambda *a: None)
    monkeypatch.setattr(rotary, "rotary_inplace", lambda *a: False)
    monkeypatch.setattr(llama, "silu_and_mul", lambda x: None)
    monkeypatch.setenv("FREIGHT_DISABLE_WEIGHT_PACKING", "1")
    path = random_model(variant)
    llm = make_llm(path)
    assert not any(getattr(m, "_packed", None) is not None for m in llm.llm_engine.engine_core.executor.worker.model.modules())
    prompts = [[(7 * i + j) % 50 + 3 for j in range(n)] for i, n in enumerate([3, 17, 40])]
    outs = generate(llm, [{"prompt_token_ids": p} for p in prompts], greedy(24))
    check_outputs(path, prompts, outs, 24, f"{variant} portable paths")


def test_prompt_forms_equivalent(make_llm, stories_dir, stories_tok):
    """str, list[int] and {"prompt_token_ids": ...} prompts give the same result; one or a list of params."""
    llm = make_llm(stories_dir)
    text = "Lily and Tom"
    ids = stories_tok(text).input_ids
    a = generate(llm, text, greedy(24))
    b = generate(llm, [{"prompt_token_ids": ids}], [greedy(24)])
    c = generate(llm, [ids], greedy(24))
    assert len(a) == len(b) == len(c) == 1
    assert list(a[0].outputs[0].token_ids) == list(b[0].outputs[0].token_ids) == list(c[0].outputs[0].token_ids)
    check_outputs(stories_dir, [ids], a, 24, "prompt forms")


def test_per_prompt_sampling_params(make_llm, stories_dir, stories_tok):
    """A list of SamplingParams, one per prompt: each request honours its own max_tokens."""
    llm = make_llm(stories_dir)
    ids = [stories_tok(p).input_ids for p in STORY_PROMPTS[:4]]
    lens = [1, 7, 30, 13]
    outs = generate(llm, as_inputs(ids), [greedy(n) for n in lens])
    for p, o, n in zip(ids, outs, lens):
        got = list(o.outputs[0].token_ids)
        assert len(got) == n, f"max_tokens={n} but got {len(got)} tokens"
        assert_same_tokens(ref(stories_dir, p, n), got, f"max_tokens={n}")
        assert o.outputs[0].finish_reason == "length"
        assert o.finished


@pytest.mark.parametrize("model", ["stories", "qwen3_qknorm"])
def test_mixed_prompt_lengths_one_batch(make_llm, stories_dir, stories_tok, random_model, model):
    """Prompts of 1..300 tokens (around block boundaries) in one generate() call."""
    lengths = [1, 2, 3, 5, 8, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 100, 127, 128, 129, 200, 255, 256, 257, 300]
    if model == "stories":
        d = stories_dir
        base = story_ids(stories_tok)
        assert len(base) > 300 + 40
        # different offsets into the story so prompts do not share prefixes beyond BOS
        prompts = [[1] + base[1 + (7 * i) % 40: (7 * i) % 40 + n] for i, n in enumerate(lengths)]
    else:
        d = random_model(model)
        prompts = [random_ids(n, vocab_of(d), seed=n) for n in lengths]
    assert [len(p) for p in prompts] == lengths
    llm = make_llm(d, max_model_len=512)
    outs = generate(llm, as_inputs(prompts), greedy(24))
    check_outputs(d, prompts, outs, 24, f"{model} mixed lengths")


# --------------------------------------------------------------------------- random-weight architectures

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_random_arch_greedy(make_llm, random_model, variant):
    """Each random-weight architecture/config equals HF for several prompts (BOS, text, ids)."""
    from transformers import AutoTokenizer

    d = random_model(variant)
    tok = AutoTokenizer.from_pretrained(str(d))
    prompts = [
        [1],
        tok("Once upon a time there was a little girl").input_ids,
        tok("tom and sam went to the sea with the dog").input_ids,
        random_ids(37, vocab_of(d), seed=37),
        random_ids(130, vocab_of(d), seed=130),
    ]
    llm = make_llm(d)
    outs = generate(llm, as_inputs(prompts), greedy(64))
    check_outputs(d, prompts, outs, 64, variant)


def test_random_arch_text_prompt_tokenization(make_llm, random_model):
    """A str prompt is tokenized like the checkpoint's HF tokenizer (Qwen-style: no BOS added)."""
    from transformers import AutoTokenizer

    for variant in ("qwen2_bias", "mistral_gqa"):
        d = random_model(variant)
        tok = AutoTokenizer.from_pretrained(str(d))
        llm = make_llm(d)
        text = "the king and the queen saw a dragon"
        outs = generate(llm, [text], greedy(16))
        ids = tok(text).input_ids
        assert list(outs[0].prompt_token_ids) == ids, variant
        check_outputs(d, [ids], outs, 16, variant)
        assert outs[0].outputs[0].text == continuation_text(tok, ids, outs[0].outputs[0].token_ids)


# --------------------------------------------------------------------------- scheduling: chunking, preemption

@pytest.mark.parametrize("model", ["stories", "llama_gqa", "mistral_swa"])
def test_chunked_prefill_small_budget(make_llm, stories_dir, stories_tok, random_model, model):
    """max_num_batched_tokens=32: every prompt longer than 32 tokens is prefilled in chunks."""
    lengths = [5, 33, 64, 90, 150, 301]
    if model == "stories":
        d = stories_dir
        base = story_ids(stories_tok)
        prompts = [[1] + base[1 + 3 * i: 3 * i + n] for i, n in enumerate(lengths)]
    else:
        d = random_model(model)
        prompts = [random_ids(n, vocab_of(d), seed=1000 + n) for n in lengths]
    llm = make_llm(d, max_num_batched_tokens=32, max_model_len=512)
    outs = generate(llm, as_inputs(prompts), greedy(32))
    check_outputs(d, prompts, outs, 32, f"{model} chunked prefill")
    steps = getattr(stats(llm), "num_steps", None)
    if steps is not None:
        need = math.ceil(sum(lengths) / 32)
        assert steps >= need, f"{sum(lengths)} prompt tokens at <= 32 per step need >= {need} steps, engine took {steps}"


@pytest.mark.parametrize("max_num_seqs", [1, 3])
def test_max_num_seqs_queueing(make_llm, stories_dir, stories_tok, max_num_seqs):
    """More requests than max_num_seqs: the rest wait, all finish in order and equal HF."""
    prompts = [stories_tok(p).input_ids for p in STORY_PROMPTS] + [[1]]
    llm = make_llm(stories_dir, max_num_seqs=max_num_seqs)
    outs = generate(llm, as_inputs(prompts), [greedy(10 + 3 * i) for i in range(len(prompts))])
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert list(o.prompt_token_ids) == p
        assert_same_tokens(ref(stories_dir, p, 10 + 3 * i), list(o.outputs[0].token_ids), f"request {i}")


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_small_kv_cache_stories(make_llm, stories_dir, stories_tok, prefix_caching):
    """A KV cache of 24 blocks for 8 requests that need ~10 blocks each: preemption must happen."""
    num_blocks = 24
    mem = num_blocks * kv_bytes_per_block(stories_dir, 16)  # 24 * 10240 bytes
    base = story_ids(stories_tok)
    prompts = [[1] + base[1 + 11 * i: 11 * i + 40] for i in range(8)]
    llm = make_llm(stories_dir, kv_cache_memory=mem, max_model_len=256, enable_prefix_caching=prefix_caching)
    s0 = stats(llm)
    assert s0.num_total_blocks <= num_blocks + 1, (
        f"kv_cache_memory={mem} bytes should give ~{num_blocks} blocks, engine made {s0.num_total_blocks}")
    outs = generate(llm, as_inputs(prompts), greedy(120))
    s1 = stats(llm)
    assert s1.num_preemptions > 0, (
        f"8 requests x 160 tokens in {s0.num_total_blocks} blocks of 16 must preempt; num_preemptions=0")
    check_outputs(stories_dir, prompts, outs, 120, f"preemption (prefix caching {prefix_caching})")
    assert s1.num_free_blocks == s1.num_total_blocks, (
        f"blocks leaked after all requests finished: {s1.num_free_blocks} free of {s1.num_total_blocks}")


def test_preemption_random_gqa_with_chunking(make_llm, random_model):
    """Preemption and chunked prefill together, on a GQA model with head_dim 16 and 8 heads."""
    d = random_model("mistral_gqa")
    num_blocks = 20
    mem = num_blocks * kv_bytes_per_block(d, 16)
    v = vocab_of(d)
    prompts = [random_ids(n, v, seed=50 + n) for n in (20, 45, 70, 33, 58, 12)]
    llm = make_llm(d, kv_cache_memory=mem, max_model_len=200, max_num_batched_tokens=48)
    outs = generate(llm, as_inputs(prompts), greedy(90))
    s = stats(llm)
    assert s.num_preemptions > 0, f"expected preemptions with {s.num_total_blocks} blocks, got none"
    check_outputs(d, prompts, outs, 90, "mistral preemption+chunking")


# --------------------------------------------------------------------------- prefix caching

def _shared_prefix_prompts(base: list[int]) -> list[list[int]]:
    p70 = base[:70]
    return [
        p70 + base[100:112],
        p70 + base[120:125],
        p70 + base[100:112],          # exact repeat in the same batch
        base[:40] + base[200:230],    # shares 40 tokens (2.5 blocks)
        base[:70],                    # the prefix alone (70 tokens, not block-aligned)
        base[:64],                    # block-aligned prompt, all blocks full
        [1] + base[300:330],          # only BOS shared
    ]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prefix_caching_same_outputs(make_llm, stories_dir, stories_tok, prefix_caching):
    """Prompts sharing prefixes (and exact repeats), in one batch and again in a second call."""
    base = story_ids(stories_tok)
    prompts = _shared_prefix_prompts(base)
    llm = make_llm(stories_dir, enable_prefix_caching=prefix_caching, max_model_len=512)
    outs1 = generate(llm, as_inputs(prompts), greedy(40))
    check_outputs(stories_dir, prompts, outs1, 40, f"prefix caching={prefix_caching} call 1")
    outs2 = generate(llm, as_inputs(prompts[::-1]), greedy(40))
    check_outputs(stories_dir, prompts[::-1], outs2, 40, f"prefix caching={prefix_caching} call 2")
    cached = [o.num_cached_tokens for o in outs2]
    if prefix_caching:
        assert sum(cached) > 0, f"second call found nothing in the prefix cache: {cached}"
        for o in outs2:
            n = o.num_cached_tokens
            assert n % 16 == 0 and n < len(o.prompt_token_ids), (
                f"num_cached_tokens={n} for a {len(o.prompt_token_ids)}-token prompt: must be whole blocks "
                "and leave at least one prompt token to compute")
    else:
        assert all(c == 0 for c in cached), f"prefix caching disabled but num_cached_tokens={cached}"
    s = stats(llm)
    assert s.num_free_blocks == s.num_total_blocks, f"blocks leaked: {s.num_free_blocks}/{s.num_total_blocks} free"


def test_prefix_caching_random_model_small_chunks(make_llm, random_model):
    """Prefix hits combined with chunked prefill (chunks not aligned to blocks) on Qwen2 with QKV bias."""
    d = random_model("qwen2_bias")
    v = vocab_of(d)
    shared = random_ids(100, v, seed=7)
    prompts = [shared + random_ids(k, v, seed=k) for k in (3, 17, 40)]
    llm = make_llm(d, max_num_batched_tokens=24, max_model_len=256)
    outs1 = generate(llm, as_inputs(prompts[:1]), greedy(20))
    outs2 = generate(llm, as_inputs(prompts[1:]), greedy(20))
    check_outputs(d, prompts[:1], outs1, 20, "qwen2 prefix call 1")
    check_outputs(d, prompts[1:], outs2, 20, "qwen2 prefix call 2")
    assert all(o.num_cached_tokens >= 96 for o in outs2), [o.num_cached_tokens for o in outs2]


def test_prefix_cache_reuse_counters(make_llm, stories_dir, stories_tok):
    """Two requests share a 256-token prefix: the second reuses 256 cached tokens and computes only the rest."""
    base = story_ids(stories_tok)
    assert len(base) >= 340
    prefix = base[:256]
    a = prefix + base[260:280]   # 276 tokens
    b = prefix + base[300:330]   # 286 tokens
    llm = make_llm(stories_dir, max_model_len=512, enable_prefix_caching=True)
    s0 = stats(llm)
    out_a = generate(llm, as_inputs([a]), greedy(8))
    s1 = stats(llm)
    out_b = generate(llm, as_inputs([b]), greedy(8))
    s2 = stats(llm)
    check_outputs(stories_dir, [a], out_a, 8, "prefix A")
    check_outputs(stories_dir, [b], out_b, 8, "prefix B")

    assert out_a[0].num_cached_tokens == 0, f"first request on a fresh engine: {out_a[0].num_cached_tokens} cached"
    assert s1.num_computed_prompt_tokens - s0.num_computed_prompt_tokens == len(a), (
        s0.num_computed_prompt_tokens, s1.num_computed_prompt_tokens, len(a))
    assert out_b[0].num_cached_tokens == 256, (
        f"request B shares 256 tokens (16 full blocks) with A; num_cached_tokens={out_b[0].num_cached_tokens}")
    computed = s2.num_computed_prompt_tokens - s1.num_computed_prompt_tokens
    assert computed == len(b) - 256, (
        f"B has {len(b)} prompt tokens of which 256 are cached; engine ran {computed} prompt tokens")
    assert s2.prefix_cache_hits - s1.prefix_cache_hits >= 256, (s1.prefix_cache_hits, s2.prefix_cache_hits)
    assert s2.prefix_cache_queries > s1.prefix_cache_queries


def test_prefix_cache_requires_whole_prefix(make_llm, stories_dir, stories_tok):
    """Blocks with the same tokens after a different prefix (or at another position) are not reused."""
    base = story_ids(stories_tok)
    shared = base[200:232]                       # two blocks' worth of tokens
    a = base[:16] + shared + base[300:310]       # [block X][S1][S2] + tail
    b = [1] + base[100:115] + shared + base[320:330]   # [block Y][S1][S2] + tail: same S1, S2 after other context
    c = shared + base[340:350]                   # S1, S2 at positions 0..31
    llm = make_llm(stories_dir, max_model_len=512)
    o1 = generate(llm, as_inputs([a]), greedy(16))
    o2 = generate(llm, as_inputs([b, c]), greedy(16))
    check_outputs(stories_dir, [a], o1, 16, "whole-prefix a")
    check_outputs(stories_dir, [b, c], o2, 16, "whole-prefix b, c")
    assert o2[0].num_cached_tokens == 0 and o2[1].num_cached_tokens == 0, (
        f"blocks reused although the preceding tokens differ: {[o.num_cached_tokens for o in o2]}")


def test_fully_cached_prompt(make_llm, stories_dir, stories_tok):
    """Re-running an identical block-aligned prompt: the last token is recomputed to get logits."""
    base = story_ids(stories_tok)
    p = base[:96]  # exactly 6 blocks
    llm = make_llm(stories_dir, max_model_len=512)
    o1 = generate(llm, as_inputs([p]), greedy(12))
    s1 = stats(llm)
    o2 = generate(llm, as_inputs([p]), greedy(12))
    s2 = stats(llm)
    check_outputs(stories_dir, [p], o1, 12, "fully cached 1")
    check_outputs(stories_dir, [p], o2, 12, "fully cached 2")
    n = o2[0].num_cached_tokens
    assert 80 <= n < 96, f"identical 96-token prompt: expected 80 (5 blocks) cached, got {n}"
    assert 1 <= s2.num_computed_prompt_tokens - s1.num_computed_prompt_tokens <= 16


# --------------------------------------------------------------------------- logprobs

@pytest.mark.parametrize("model", ["stories", "qwen2_bias", "llama_rope_llama3"])
def test_sampled_logprobs_match_hf(make_llm, stories_dir, stories_tok, random_model, model):
    """logprobs=0: each step's dict has the sampled token's log_softmax(raw logits) within 1e-4."""
    if model == "stories":
        d = stories_dir
        prompts = [[1], stories_tok("Once upon a time").input_ids]
    else:
        d = random_model(model)
        prompts = [[1], random_ids(40, vocab_of(d), seed=40)]
    n = 48
    llm = make_llm(d)
    outs = generate(llm, as_inputs(prompts), greedy(n, logprobs=0))
    check_outputs(d, prompts, outs, n, f"{model} logprobs")
    for p, o in zip(prompts, outs):
        r = ref(d, p, n)
        c = o.outputs[0]
        assert c.logprobs is not None and len(c.logprobs) == n, f"expected {n} logprob dicts, got {c.logprobs!r:.200}"
        total = 0.0
        for i, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
            assert tok in lp, f"step {i}: sampled token {tok} missing from logprobs {lp}"
            val = lp[tok]
            val = getattr(val, "logprob", val)  # tolerate vLLM's Logprob objects
            assert abs(val - r.logprobs[i]) < 1e-4, f"step {i}: logprob {val} vs HF {r.logprobs[i]}"
            total += val
        assert c.cumulative_logprob is not None
        assert abs(c.cumulative_logprob - total) < 1e-4 * n, (c.cumulative_logprob, total)
        assert abs(c.cumulative_logprob - sum(r.logprobs)) < 1e-4 * n, (c.cumulative_logprob, sum(r.logprobs))


def test_topk_logprobs_match_hf(make_llm, stories_dir, stories_tok):
    """logprobs=3: the top-3 (plus the sampled token) with values matching HF's log_softmax."""
    d = stories_dir
    p = stories_tok("Lily and Tom").input_ids
    n, k = 16, 3
    llm = make_llm(d)
    outs = generate(llm, as_inputs([p]), greedy(n, logprobs=k))
    check_outputs(d, [p], outs, n, "top-k logprobs")
    r = ref(d, p, n)
    logp = torch.log_softmax(r.logits.double(), dim=-1)
    for i, lp in enumerate(outs[0].outputs[0].logprobs):
        assert k <= len(lp) <= k + 1, f"step {i}: {len(lp)} entries for logprobs={k}"
        vals = {t: float(getattr(v, "logprob", v)) for t, v in lp.items()}
        for t, v in vals.items():
            assert abs(v - float(logp[i, t])) < 1e-4, f"step {i} token {t}: {v} vs HF {float(logp[i, t])}"
        hf_top = torch.topk(logp[i], k)
        best_k = sorted(vals.values(), reverse=True)[:k]
        for a, b in zip(best_k, hf_top.values.tolist()):
            assert abs(a - b) < 1e-4, f"step {i}: top-{k} values {best_k} vs HF {hf_top.values.tolist()}"


# --------------------------------------------------------------------------- stopping

@pytest.mark.parametrize("variant,text,eos_at", [
    ("qwen3_qknorm", "Once upon a time there was a little girl", 2),
    ("llama_gqa", "tom and sam went to the sea with the dog", 33),
])
def test_stops_at_eos(make_llm, random_model, variant, text, eos_at):
    """Without ignore_eos, generation ends at the model's first EOS (id 2), finish_reason 'stop'."""
    from freight import SamplingParams
    from transformers import AutoTokenizer

    d = random_model(variant)
    ids = AutoTokenizer.from_pretrained(str(d))(text).input_ids
    r = ref(d, ids, 64)
    assert r.tokens.index(2) == eos_at, "test premise: the reference emits EOS at this step"
    llm = make_llm(d)
    o = generate(llm, as_inputs([ids]), SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert list(o.token_ids) == r.tokens[:eos_at + 1], (
        f"expected the {eos_at} tokens before EOS and EOS itself, got {list(o.token_ids)}")
    assert o.finish_reason == "stop"


def test_stop_token_ids(make_llm, stories_dir):
    """stop_token_ids: ends at the first occurrence (kept in token_ids, as vLLM does), reason 'stop'."""
    from freight import SamplingParams

    r = ref(stories_dir, [1], 64)
    stop = r.tokens[20]
    first = r.tokens.index(stop)
    llm = make_llm(stories_dir)
    o = generate(llm, as_inputs([[1]]), SamplingParams(temperature=0, max_tokens=64, stop_token_ids=[stop]))
    c = o[0].outputs[0]
    assert list(c.token_ids) == r.tokens[:first + 1], (stop, list(c.token_ids))
    assert c.finish_reason == "stop"
    assert c.stop_reason == stop


@pytest.mark.parametrize("chunk", [None, 32])
def test_prompt_logprobs_match_hf(make_llm, stories_dir, stories_tok, chunk):
    """prompt_logprobs=0: None for the first prompt token, then each token's log_softmax under HF
    (also when the prompt is prefilled in 32-token chunks)."""
    from freight import SamplingParams

    if "prompt_logprobs" not in inspect.signature(SamplingParams).parameters:
        pytest.skip("SamplingParams has no prompt_logprobs")
    p = story_ids(stories_tok)[:100]
    llm = make_llm(stories_dir, max_num_batched_tokens=chunk, max_model_len=512)
    o = generate(llm, as_inputs([p]), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True,
                                                     prompt_logprobs=0))[0]
    assert o.prompt_logprobs is not None and len(o.prompt_logprobs) == len(p), o.prompt_logprobs
    assert o.prompt_logprobs[0] is None
    from hf_reference import load_hf

    with torch.no_grad():
        logits = load_hf(str(stories_dir))(input_ids=torch.tensor([p])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    for i in range(1, len(p)):
        d = o.prompt_logprobs[i]
        assert p[i] in d, f"position {i}: prompt token {p[i]} missing from {d}"
        v = getattr(d[p[i]], "logprob", d[p[i]])
        assert abs(v - float(logp[i - 1, p[i]])) < 1e-4, f"position {i}: {v} vs HF {float(logp[i - 1, p[i]])}"


# --------------------------------------------------------------------------- limits and errors

def test_prompt_longer_than_max_model_len_raises(make_llm, stories_dir):
    llm = make_llm(stories_dir, max_model_len=64)
    with pytest.raises(ValueError, match=r"(?i)(max_model_len|maximum model length|too long|context)"):
        generate(llm, as_inputs([list(range(3, 103))]), greedy(4))
    # the engine is still usable afterwards
    outs = generate(llm, as_inputs([[1]]), greedy(8))
    check_outputs(stories_dir, [[1]], outs, 8, "after rejected prompt")


def test_bad_request_does_not_affect_others(make_llm, stories_dir, stories_tok):
    """Via the engine API: an over-long request is rejected, the valid ones in flight finish correctly."""
    llm = make_llm(stories_dir, max_model_len=64)
    eng = llm.llm_engine
    good = [stories_tok(t).input_ids for t in STORY_PROMPTS[:2]]
    eng.add_request("good-0", {"prompt_token_ids": good[0]}, greedy(20))
    with pytest.raises(ValueError):
        eng.add_request("bad", {"prompt_token_ids": list(range(3, 103))}, greedy(4))
    eng.add_request("good-1", {"prompt_token_ids": good[1]}, greedy(20))
    finished = {}
    for _ in range(200):
        if not eng.has_unfinished_requests():
            break
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o
    assert set(finished) == {"good-0", "good-1"}, sorted(finished)
    check_outputs(stories_dir, good, [finished["good-0"], finished["good-1"]], 20, "engine API")


def test_generation_stops_at_max_model_len(make_llm, stories_dir):
    """prompt + max_tokens beyond max_model_len: generation stops at max_model_len with 'length'."""
    llm = make_llm(stories_dir, max_model_len=64)
    p = [1] + list(range(300, 359))  # 60 tokens
    outs = generate(llm, as_inputs([p]), greedy(20))
    got = list(outs[0].outputs[0].token_ids)
    assert len(got) == 4, f"prompt 60 + generated must not exceed max_model_len 64; got {len(got)} tokens"
    assert outs[0].outputs[0].finish_reason == "length"
    assert_same_tokens(ref(stories_dir, p, 4), got, "capped at max_model_len")


@pytest.mark.timeout(120)
def test_request_larger_than_kv_cache_does_not_hang(stories_dir):
    """A prompt needing more blocks than the whole cache holds is refused (at LLM() or generate()), never hangs."""
    from freight import LLM

    mem = 8 * kv_bytes_per_block(stories_dir, 16)  # 128 tokens of KV cache
    try:
        llm = LLM(model=str(stories_dir), dtype="float32", device="cpu", block_size=16,
                  kv_cache_memory=mem, max_model_len=512)
    except ValueError:
        return  # vLLM's behaviour: max_model_len does not fit in the KV cache
    try:
        outs = generate(llm, as_inputs([[1] + list(range(300, 500))]), greedy(4))
    except ValueError:
        return
    assert outs[0].outputs[0].finish_reason in ("abort", "length", "error"), outs[0]


def test_free_blocks_after_generate(make_llm, random_model):
    d = random_model("llama_gqa")
    llm = make_llm(d, kv_cache_memory=40 * kv_bytes_per_block(d, 16), max_model_len=256)
    s0 = stats(llm)
    assert s0.num_free_blocks == s0.num_total_blocks > 0
    generate(llm, as_inputs([random_ids(n, 512, n) for n in (10, 50, 90)]), greedy(30))
    s1 = stats(llm)
    assert s1.num_free_blocks == s1.num_total_blocks == s0.num_total_blocks, (s0, s1)


def test_abort_frees_blocks(make_llm, random_model):
    """Aborting requests mid-generation returns their blocks; others finish correctly."""
    d = random_model("llama_gqa")
    llm = make_llm(d, max_model_len=256)
    eng = llm.llm_engine
    prompts = [random_ids(n, 512, 500 + n) for n in (20, 70)]
    eng.add_request("keep", {"prompt_token_ids": prompts[0]}, greedy(30))
    eng.add_request("drop", {"prompt_token_ids": prompts[1]}, greedy(100))
    for _ in range(5):
        eng.step()
    eng.abort_request("drop")
    done = {}
    for _ in range(100):
        if not eng.has_unfinished_requests():
            break
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert "keep" in done and "drop" not in done, sorted(done)
    check_outputs(d, prompts[:1], [done["keep"]], 30, "after abort")
    s = stats(llm)
    assert s.num_free_blocks == s.num_total_blocks, f"abort leaked blocks: {s.num_free_blocks}/{s.num_total_blocks}"


# --------------------------------------------------------------------------- sampling (light checks)

def test_top_k_1_equals_greedy(make_llm, stories_dir):
    from freight import SamplingParams

    llm = make_llm(stories_dir)
    outs = generate(llm, as_inputs([[1]]),
                    SamplingParams(temperature=0.8, top_k=1, max_tokens=32, ignore_eos=True, seed=3))
    assert_same_tokens(ref(stories_dir, [1], 32), list(outs[0].outputs[0].token_ids), "top_k=1")


def test_seeded_sampling_reproducible(make_llm, stories_dir):
    from freight import SamplingParams

    llm = make_llm(stories_dir)

    def sp(seed):
        return SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=seed)

    a = generate(llm, as_inputs([[1]]), sp(1))[0].outputs[0].token_ids
    b = generate(llm, as_inputs([[1], [1, 403]]), [sp(1), sp(2)])[0].outputs[0].token_ids
    c = generate(llm, as_inputs([[1]]), sp(2))[0].outputs[0].token_ids
    assert list(a) == list(b), "same seed must give the same tokens, also when batched with other requests"
    assert list(a) != list(c), "different seeds gave identical 40-token samples"


def _first_token_samples(llm, n_samples: int, **kw) -> list[int]:
    from freight import SamplingParams

    params = [SamplingParams(max_tokens=1, ignore_eos=True, seed=i, **kw) for i in range(n_samples)]
    outs = generate(llm, as_inputs([[1]] * n_samples), params)
    return [o.outputs[0].token_ids[0] for o in outs]


def _hf_first_token_probs(model_dir) -> torch.Tensor:
    return torch.softmax(ref(model_dir, [1], 1).logits[0].double(), dim=-1)


@pytest.mark.parametrize("filt", [dict(top_k=2), dict(top_p=0.9), dict(top_p=0.5)])
def test_sampling_filters_and_distribution(make_llm, stories_dir, filt):
    """temperature=1 sampling from BOS honours top_k / top_p and follows the model's probabilities.

    From BOS stories260k puts p=0.78 on token 403 and 0.156 on 385 (then < 0.016 each), so
    top_k=2 and top_p=0.9 keep {403, 385} (403 with p ~ 0.834 after renormalising) and
    top_p=0.5 keeps {403} only (vLLM's rule: the smallest set reaching top_p).
    """
    probs = _hf_first_token_probs(stories_dir)
    top = torch.topk(probs, 2)
    keep = [int(top.indices[0])] if filt.get("top_p") == 0.5 else top.indices.tolist()
    llm = make_llm(stories_dir)
    n = 200
    samples = _first_token_samples(llm, n, temperature=1.0, **filt)
    assert set(samples) <= set(keep), f"{filt}: sampled {sorted(set(samples) - set(keep))} outside {keep}"
    if len(keep) == 2:
        expected = float(top.values[0] / top.values.sum())
        frac = samples.count(keep[0]) / n
        assert abs(frac - expected) < 0.1, f"{filt}: token {keep[0]} sampled {frac:.3f} of the time, p={expected:.3f}"


def test_logprobs_are_raw_with_temperature(make_llm, stories_dir, stories_tok):
    """Logprobs are the model's raw log_softmax, not after temperature / top-k (vLLM's default)."""
    from freight import SamplingParams

    p = stories_tok("The little dog").input_ids
    llm = make_llm(stories_dir)
    sp = SamplingParams(temperature=0.5, top_k=1, max_tokens=16, ignore_eos=True, logprobs=0, seed=0)
    o = generate(llm, as_inputs([p]), sp)[0].outputs[0]
    r = ref(stories_dir, p, 16)
    assert_same_tokens(r, list(o.token_ids), "top_k=1")
    for i, (t, lp) in enumerate(zip(o.token_ids, o.logprobs)):
        v = getattr(lp[t], "logprob", lp[t])
        assert abs(v - r.logprobs[i]) < 1e-4, f"step {i}: logprob {v} vs raw HF {r.logprobs[i]}"


# --------------------------------------------------------------------------- chat and CLI

def test_chat_uses_template(make_llm, random_model):
    from transformers import AutoTokenizer

    d = random_model("qwen3_qknorm")
    tok = AutoTokenizer.from_pretrained(str(d))
    llm = make_llm(d)
    if not hasattr(llm, "chat"):
        pytest.skip("LLM.chat not implemented")
    messages = [{"role": "user", "content": "tell me about the dragon"}]
    outs = llm.chat(messages, greedy(16))
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    assert list(outs[0].prompt_token_ids) == list(ids)
    check_outputs(d, [list(ids)], outs, 16, "chat")


def test_cli_generate(stories_dir):
    repo = Path(__file__).resolve().parents[1]
    exe = Path(sys.executable).parent / "freight"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "freight"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        cmd + ["generate", "--model", str(stories_dir), "--prompt", "Once upon a time", "--max-tokens", "40"],
        capture_output=True, text=True, timeout=240, cwd=repo, env=env,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    out = proc.stdout.strip()
    assert "Once upon a time" in out, f"expected the prompt and its continuation on stdout, got {out!r}"
    story = out.split("Once upon a time", 1)[1]
    assert sum(ch.isalpha() for ch in story) >= 40, f"expected a story after the prompt, got {out!r}"
