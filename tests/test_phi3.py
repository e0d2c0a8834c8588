"""Phi-3 (Phi3ForCausalLM): freight's greedy output equals transformers' token for token.

Seeded random tiny Phi-3 checkpoints built with transformers (fused qkv_proj / gate_up_proj
in the checkpoint, GQA): plain RoPE; LongRoPE with a partial rotary (0.75 of each head) and
original_max_position_embeddings 64 < max_position_embeddings 256; a sliding window with
tied embeddings. Covered: one prompt, a batch of several lengths, small prefill chunks,
preemption, a prefix-cache hit, TP=2, and LongRoPE prompts within, beyond and crossing the
original context (see freight/models/phi3.py for what is and is not matched there).
On a mismatch the message says whether the reference's top-2 gap was a near-tie (< 1e-3).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from hf_reference import assert_matches_hf as check, assert_same_tokens, check_prefix_cache_hit, check_preemption
from hf_reference import cached_greedy as ref, run_greedy as run
from model_factory import BOS_ID, EOS_ID, PAD_ID, _perturb, make_tokenizer

pytestmark = pytest.mark.timeout(300)

VOCAB = 512
ORIGINAL_MAX = 64  # LongRoPE's pretraining context in the longrope variant
QK_SCALE = 6.0


def _factors(n: int, lo: float, hi: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [round(lo + (hi - lo) * rng.random(), 4) for _ in range(n)]


VARIANTS = {
    "phi3": dict(),
    # head_dim 16, rotary on 12 dims: 6 factors each
    "phi3_longrope": dict(rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
        "short_factor": _factors(6, 1.0, 1.5, 1), "long_factor": _factors(6, 2.0, 8.0, 2),
        "original_max_position_embeddings": ORIGINAL_MAX},
        original_max_position_embeddings=ORIGINAL_MAX),
    "phi3_swa_tied": dict(sliding_window=12, tie_word_embeddings=True, num_hidden_layers=3),
}


def make_phi3(out_dir, seed: int = 0, **overrides):
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kw.update(overrides)
    cfg = Phi3Config(**kw)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        _perturb(model, seed, lm_head_scale=8.0, tied_embed_scale=0.3)
        # Sharpen attention (random init gives near-uniform attention, where positions hardly
        # matter): scale the Q and K rows of every fused qkv_proj, so RoPE decides the tokens.
        qk_rows = (cfg.num_attention_heads + cfg.num_key_value_heads) * (cfg.hidden_size // cfg.num_attention_heads)
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight[:qk_rows].mul_(QK_SCALE)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(str(out_dir))
    make_tokenizer(out_dir, VOCAB, add_bos=True)
    return out_dir


@pytest.fixture(scope="module")
def phi3_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3")
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = make_phi3(root / name, seed=len(built) + 11, **VARIANTS[name])
        return built[name]

    return get


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [BOS_ID] + [rng.randrange(3, VOCAB) for _ in range(n - 1)]


N = 24
SHORT_PROMPTS = [ids(n, seed=n) for n in (5, 17, 33, 40, 9)]  # + 24 tokens stays within 64 positions


def test_checkpoint_is_fused(phi3_model):
    """The checkpoint really stores qkv_proj / gate_up_proj fused (what the loader must split)."""
    from safetensors import safe_open

    d = phi3_model("phi3")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    cfg = json.loads((phi3_model("phi3_longrope") / "config.json").read_text())
    assert cfg["architectures"] == ["Phi3ForCausalLM"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_prompt_and_batch(make_llm, phi3_model, variant):
    d = phi3_model(variant)
    llm = make_llm(d)
    check(d, SHORT_PROMPTS[:1], run(llm, SHORT_PROMPTS[:1], N), N, f"{variant} single")
    check(d, SHORT_PROMPTS, run(llm, SHORT_PROMPTS, N), N, f"{variant} batch")


@pytest.mark.parametrize("variant", ["phi3_longrope", "phi3_swa_tied"])
def test_small_prefill_chunks(make_llm, phi3_model, variant):
    d = phi3_model(variant)
    llm = make_llm(d, max_num_batched_tokens=16)
    check(d, SHORT_PROMPTS, run(llm, SHORT_PROMPTS, N), N, f"{variant} chunks of 16")


def test_preemption(make_llm, phi3_model):
    d = phi3_model("phi3_longrope")
    prompts = SHORT_PROMPTS + [ids(n, seed=100 + n) for n in (21, 30, 12)]
    check_preemption(make_llm, d, prompts, N, "longrope preemption")


def test_prefix_cache_hit(make_llm, phi3_model):
    d = phi3_model("phi3")
    shared = ids(48, seed=5)
    prompts = [shared + ids(k, seed=k)[1:] for k in (4, 12)]
    check_prefix_cache_hit(make_llm, d, prompts, N)


LONG_PROMPTS = [ids(n, seed=200 + n) for n in (80, 65, 130)]  # beyond original_max_position_embeddings


def test_longrope_beyond_original_context(make_llm, phi3_model):
    """Prompts already longer than original_max_position_embeddings (one prefill chunk each):
    transformers rotates everything with the long factors, and so does freight."""
    d = phi3_model("phi3_longrope")
    llm = make_llm(d, max_num_batched_tokens=256)
    got = run(llm, LONG_PROMPTS + SHORT_PROMPTS[:2], N)
    check(d, LONG_PROMPTS + SHORT_PROMPTS[:2], got, N, "longrope long+short batch")


def test_longrope_crossing_matches_stepwise_forward(make_llm, phi3_model):
    """A generation crossing the threshold equals transformers' step-by-step cached forward
    (new tokens long, cached keys short). transformers' generate() instead re-encodes the whole
    sequence with the long factors when it reaches original_max + 1 tokens; freight does not
    (documented in freight/models/phi3.py), so generate() is not asserted here."""
    d = phi3_model("phi3_longrope")
    prompts = [ids(n, seed=300 + n) for n in (50, 60)]
    got = run(make_llm(d), prompts, N)
    check(d, prompts, got, N, "longrope crossing")


def test_tp2_equals_tp1_and_hf(make_llm, phi3_model):
    d = phi3_model("phi3_longrope")
    prompts = SHORT_PROMPTS[:3] + LONG_PROMPTS[:1]
    tp1 = run(make_llm(d, max_num_batched_tokens=128), prompts, N)
    tp2 = run(make_llm(d, max_num_batched_tokens=128, tensor_parallel_size=2), prompts, N)
    for i, (a, b) in enumerate(zip(tp1, tp2)):
        assert_same_tokens(ref(d, prompts[i], N), b, f"TP=2 prompt#{i}")
        assert a == b, f"prompt#{i}: TP=2 {b} != TP=1 {a}"


def test_longrope_v4_style_config(make_llm, phi3_model, tmp_path):
    """A transformers-4 era config (Phi-3-mini-128k's shape): `rope_scaling` {"type": "longrope"},
    rope_theta, partial_rotary_factor and original_max_position_embeddings at the top level.
    (transformers 5 cannot load the older spelling "su" itself: it checks the keys before renaming.)"""
    import shutil

    src = phi3_model("phi3_longrope")
    d = tmp_path / "phi3_v4"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
    rp.pop("original_max_position_embeddings")
    rp.pop("rope_type")
    cfg["rope_scaling"] = dict(rp, type="longrope")
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    prompts = SHORT_PROMPTS[:2] + LONG_PROMPTS[:1]
    got = run(make_llm(d), prompts, N)
    check(d, prompts, got, N, "v4-style config")
    # the same checkpoint, so the same tokens as the v5-style config
    check(src, prompts, got, N, "v4-style config vs v5 config")


def test_su_is_longrope():
    from freight.layers.rotary import RotaryEmbedding

    scaling = dict(VARIANTS["phi3_longrope"]["rope_parameters"])
    a = RotaryEmbedding(12, 256, 10000.0, dict(scaling, rope_type="longrope"))
    scaling.pop("rope_type")
    b = RotaryEmbedding(12, 256, 10000.0, dict(scaling, type="su"))
    assert a.long_offset == b.long_offset == 256
    assert torch.equal(a.cos_cache, b.cos_cache) and torch.equal(a.sin_cache, b.sin_cache)
