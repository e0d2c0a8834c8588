"""Checks of the test helpers themselves, against transformers alone (no freight needed).

The random checkpoints must (1) load in transformers, (2) decode greedily into
varied text (not one token repeated) with clear top-2 gaps, so token-exact
comparisons are meaningful, and (3) actually depend on the feature each variant
is meant to cover: e.g. zeroing Qwen2's QKV biases or dropping the RoPE scaling
must change the greedy output, or an engine that ignored them would still pass.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from hf_reference import NEAR_TIE, degeneracy, greedy_with_model, hf_generate, hf_greedy, load_hf
from model_factory import VARIANTS

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_is_non_degenerate(random_model, variant):
    d = random_model(variant)
    for prompt in ([1], list(range(3, 40))):
        r = hf_greedy(d, prompt, 64)
        distinct, longest_run = degeneracy(r.tokens)
        assert distinct >= 10 and longest_run < 32, f"{variant}: degenerate greedy output {r.tokens}"
        assert r.min_gap > NEAR_TIE, f"{variant}: near-tie (gap {r.min_gap}) in the first 64 steps"


def test_hf_greedy_matches_generate(stories_dir, random_model):
    """Our cached greedy loop equals transformers' model.generate()."""
    for d in (stories_dir, random_model("qwen3_qknorm")):
        assert hf_greedy(d, [1], 48).tokens == hf_generate(d, [1], 48)


def test_stories_documented_story(stories_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stories_dir))
    text = tok.decode(hf_greedy(stories_dir, [1], 40).tokens)
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text


def _differs(model_a, model_b, prompt, n=48) -> bool:
    return greedy_with_model(model_a, prompt, n).tokens != greedy_with_model(model_b, prompt, n).tokens


@pytest.mark.parametrize("variant,what", [
    ("qwen2_bias", "bias"),
    ("qwen3_qknorm", "qk_norm"),
    ("llama_gqa", "rms_norm"),
])
def test_feature_matters_weights(random_model, variant, what):
    """Neutralising a weight feature in transformers changes the greedy output."""
    d = random_model(variant)
    base = load_hf(str(d))
    mutated = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in mutated.named_parameters():
            if what == "bias" and name.endswith(".bias"):
                p.zero_()
            elif what == "qk_norm" and ("q_norm" in name or "k_norm" in name):
                p.fill_(1.0)
            elif what == "rms_norm" and "layernorm" in name:
                p.fill_(1.0)
    assert _differs(base, mutated, [1]) or _differs(base, mutated, list(range(3, 30))), (
        f"{variant}: output does not depend on {what}; the variant tests nothing")


@pytest.mark.parametrize("variant", ["llama_rope_llama3", "llama_rope_linear"])
def test_feature_matters_rope_scaling(random_model, tmp_path, variant):
    """Dropping the RoPE scaling from config.json changes the greedy output."""
    from transformers import AutoModelForCausalLM

    d = random_model(variant)
    plain = tmp_path / "plain"
    shutil.copytree(d, plain)
    cfg = json.loads((plain / "config.json").read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta", 10000.0)
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    (plain / "config.json").write_text(json.dumps(cfg))
    other = AutoModelForCausalLM.from_pretrained(str(plain), dtype=torch.float32).eval()
    assert other.config.rope_parameters["rope_type"] == "default"
    assert load_hf(str(d)).config.rope_parameters["rope_type"] != "default"
    prompt = list(range(3, 120))
    assert _differs(load_hf(str(d)), other, prompt), f"{variant}: RoPE scaling does not change the output"


def test_feature_matters_sliding_window(random_model, tmp_path):
    """mistral_swa: the 24-token sliding window changes the output (vs. full attention)."""
    from transformers import AutoModelForCausalLM

    d = random_model("mistral_swa")
    full = tmp_path / "full"
    shutil.copytree(d, full)
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["sliding_window"] == 24
    cfg["sliding_window"] = None
    (full / "config.json").write_text(json.dumps(cfg))
    other = AutoModelForCausalLM.from_pretrained(str(full), dtype=torch.float32).eval()
    assert _differs(load_hf(str(d)), other, list(range(3, 60))), "sliding window does not change the output"
    assert _differs(load_hf(str(d)), other, [1]), "sliding window does not matter when generating past it from BOS"
