"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): freight's greedy output equals
transformers' token for token.

Seeded random tiny checkpoints saved by transformers 5 (per-expert tensors, as on the Hub):
Mixtral with 4 experts; Qwen2-MoE with 8 experts, a gated shared expert, no top-k
renormalisation and a dense layer (mlp_only_layers); Qwen3-MoE with 8 experts, q/k norm,
renormalisation and decoder_sparse_step 2 (layer 0 dense). Router and expert weights are
scaled up so that routing matters and top-k choices are far from ties. Covered: a batch of
several prompt lengths in small prefill chunks (each architecture); preemption, a prefix-cache
hit and TP=2 (Qwen2-MoE); grouped experts == a per-token loop; transformers 5's stacked
`experts.gate_up_proj` / `down_proj` checkpoint names load too. On a mismatch the message says
whether the reference's top-2 gap was a near-tie (< 1e-3).
"""

from __future__ import annotations

import random

import pytest
import torch

from hf_reference import assert_matches_hf as check, assert_same_tokens, check_prefix_cache_hit, check_preemption
from hf_reference import cached_greedy as ref, run_greedy as run
from model_factory import BOS_ID, EOS_ID, PAD_ID, _perturb, make_tokenizer

pytestmark = pytest.mark.timeout(300)

VOCAB = 512
N = 24
ROUTER_SCALE = 4.0  # router logits spread over several units: top-k far from ties
EXPERT_SCALE = 6.0  # experts' output comparable to attention's
QK_SCALE = 4.0

COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
              pad_token_id=PAD_ID, num_experts_per_tok=2,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

ARCHS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=32, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                       shared_expert_intermediate_size=48, norm_topk_prob=False, decoder_sparse_step=1,
                       mlp_only_layers=[1], use_sliding_window=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8, head_dim=16,
                       norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[], use_sliding_window=False)),
}


def make_moe(out_dir, arch: str, seed: int = 0):
    import transformers
    from transformers import GenerationConfig

    cfg_name, model_name, kw = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**COMMON, **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        _perturb(model, seed, lm_head_scale=8.0, tied_embed_scale=0.3)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * ROUTER_SCALE / p.shape[1] ** 0.5)
            elif ".experts." in name or "shared_expert." in name:
                p.mul_(EXPERT_SCALE)
            elif name.endswith("shared_expert_gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 2 / p.shape[1] ** 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(QK_SCALE)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(str(out_dir))
    make_tokenizer(out_dir, VOCAB, add_bos=True)
    return out_dir


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = make_moe(root / arch, arch, seed=len(built) + 21)
        return built[arch]

    return get


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [BOS_ID] + [rng.randrange(3, VOCAB) for _ in range(n - 1)]


PROMPTS = [ids(n, seed=n) for n in (5, 17, 33, 9)]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_batch_small_prefill_chunks(make_llm, moe_model, arch):
    d = moe_model(arch)
    llm = make_llm(d, max_num_batched_tokens=16)
    check(d, PROMPTS, run(llm, PROMPTS, N), N, f"{arch} chunks of 16")


def test_routing_is_exercised(moe_model):
    """Every expert is chosen by some token, and no top-k choice is a near-tie of router logits."""
    from hf_reference import load_hf

    d = moe_model("qwen3_moe")
    model = load_hf(str(d))
    seen, gaps = set(), []

    def hook(mod, args, out):
        logits = out[0] if isinstance(out, tuple) else out
        probs = torch.softmax(logits.float(), -1).sort(-1, descending=True).values
        gaps.append(float((probs[:, 1] - probs[:, 2]).min()))
        seen.update(logits.topk(2, -1).indices.flatten().tolist())

    hooks = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    try:
        with torch.no_grad():
            model(torch.tensor([PROMPTS[2]]))
    finally:
        for h in hooks:
            h.remove()
    assert seen == set(range(8)), seen
    assert min(gaps) > 1e-3, gaps


def test_preemption(make_llm, moe_model):
    d = moe_model("qwen2_moe")
    prompts = PROMPTS + [ids(n, seed=100 + n) for n in (21, 30, 12)]
    check_preemption(make_llm, d, prompts, N, "qwen2_moe preemption")


def test_prefix_cache_hit(make_llm, moe_model):
    d = moe_model("qwen2_moe")
    shared = ids(48, seed=5)
    prompts = [shared + ids(k, seed=k)[1:] for k in (4, 12)]
    check_prefix_cache_hit(make_llm, d, prompts, N)


def test_tp2_equals_tp1_and_hf(make_llm, moe_model):
    d = moe_model("qwen2_moe")
    prompts = PROMPTS[:3]
    tp1 = run(make_llm(d), prompts, N)
    tp2 = run(make_llm(d, tensor_parallel_size=2), prompts, N)
    assert tp1 == tp2
    for i, got in enumerate(tp2):
        assert_same_tokens(ref(d, prompts[i], N), got, f"TP=2 prompt#{i}")


def test_stacked_checkpoint_names_load(make_llm, moe_model, tmp_path):
    """transformers 5's in-memory names (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I])
    load into the same model as the Hub's per-expert tensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = moe_model("mixtral")
    d = tmp_path / "stacked"
    shutil.copytree(src, d)
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for layer in range(2):
        pre = f"model.layers.{layer}.block_sparse_moe"
        e = [f"{pre}.experts.{i}" for i in range(4)]
        gate = torch.stack([tensors.pop(f"{x}.w1.weight") for x in e])
        up = torch.stack([tensors.pop(f"{x}.w3.weight") for x in e])
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([tensors.pop(f"{x}.w2.weight") for x in e])
        out[f"model.layers.{layer}.mlp.gate.weight"] = tensors.pop(f"{pre}.gate.weight")
    out.update(tensors)
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    got = run(make_llm(d), PROMPTS[:2], N)
    check(src, PROMPTS[:2], got, N, "mixtral stacked names")


def test_missing_expert_is_reported(make_llm, moe_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = moe_model("mixtral")
    d = tmp_path / "missing"
    shutil.copytree(src, d)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception, match=r"experts\.2\.w3"):
        make_llm(d)


@pytest.mark.parametrize("renormalize", [True, False])
def test_grouped_experts_equal_naive_loop(renormalize):
    from freight.layers.moe import FusedMoE, naive_moe

    torch.manual_seed(0)
    moe = FusedMoE(num_experts=8, top_k=2, hidden=64, intermediate=32, renormalize=renormalize)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
        x = torch.randn(37, 64)
        got = moe(x)
        want = naive_moe(x, moe)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert moe.route(x)[1].unique().numel() == 8  # every expert has tokens
