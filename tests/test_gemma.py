"""Gemma 2 and Gemma 3 (text): greedy output token-equal to transformers on tiny random models.

The models have 4 layers (sliding-window and global layers both appear), a sliding window
of 8 (shorter than most prompts here), Gemma 2's attention and final logit soft-capping
switched on with caps small enough that tanh is far from linear, and Gemma 3's q/k norms
with different RoPE bases for sliding and global layers plus linear rope scaling on the
global ones. References come from `hf_reference.hf_greedy`; a mismatch message says whether
the reference was at a near-tie there.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from hf_reference import Reference, describe_divergence, hf_greedy
from model_factory import BOS_ID, EOS_ID, PAD_ID, _perturb, kv_bytes_per_block, make_tokenizer

pytestmark = pytest.mark.timeout(300)

VOCAB = 512
N = 24
ARCHS = ["gemma2", "gemma3"]

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
               max_position_embeddings=1024, rms_norm_eps=1e-6, query_pre_attn_scalar=16,
               pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=True)


def _config(arch: str):
    import transformers

    if arch == "gemma2":
        return transformers.Gemma2Config(**_COMMON, attn_logit_softcapping=5.0, final_logit_softcapping=4.0,
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    # layer types: sliding, sliding, global, sliding (pattern 3)
    return transformers.Gemma3TextConfig(
        **_COMMON, sliding_window_pattern=3,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}})


def _build(out_dir: Path, arch: str, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, GenerationConfig

    cfg = _config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    _perturb(model, seed, lm_head_scale=12.0 if arch == "gemma2" else 4.0, tied_embed_scale=0.3)
    with torch.no_grad():  # bigger q/k so the attention soft-cap (and q/k norms) matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(str(out_dir))
    make_tokenizer(out_dir, VOCAB, add_bos=True)
    return out_dir


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = _build(tmp_path_factory.mktemp(arch), arch)
        return built[arch]

    return get


_REF: dict[tuple[str, tuple[int, ...]], Reference] = {}


def ref(model_dir, prompt) -> Reference:
    key = (str(model_dir), tuple(prompt))
    if key not in _REF:
        _REF[key] = hf_greedy(model_dir, list(prompt), N)
    return _REF[key]


def llm(model_dir, **kw):
    from freight import LLM

    kw.setdefault("kv_cache_memory", "64MiB")
    kw.setdefault("max_model_len", 256)
    return LLM(str(model_dir), dtype="float32", device="cpu", **kw)


def run(engine, prompts) -> list[list[int]]:
    from freight import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
    outs = engine.generate([{"prompt_token_ids": list(p)} for p in prompts], sp, use_tqdm=False)
    assert [list(o.prompt_token_ids) for o in outs] == [list(p) for p in prompts], "outputs out of order"
    return [list(o.outputs[0].token_ids) for o in outs]


def check(model_dir, prompts, got, label: str) -> None:
    problems = [describe_divergence(ref(model_dir, p), g, f"{label} prompt#{i} (len {len(p)})")
                for i, (p, g) in enumerate(zip(prompts, got))]
    problems = [m for m in problems if m]
    assert not problems, f"{len(problems)}/{len(prompts)} outputs differ from HF:\n" + "\n".join(problems)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [BOS_ID] + [rng.randrange(3, VOCAB) for _ in range(n - 1)]


PROMPTS = [prompt(n, seed=n) for n in (5, 13, 30, 47)]


def test_reference_is_not_degenerate(gemma_dir):
    """The tiny models must produce varied text, or the parity tests prove little."""
    for arch in ARCHS:
        r = ref(gemma_dir(arch), PROMPTS[2])
        assert len(set(r.tokens)) >= 6, f"{arch}: reference output too repetitive: {r.tokens}"


@pytest.mark.parametrize("arch", ARCHS)
def test_single_prompt(gemma_dir, arch):
    d = gemma_dir(arch)
    check(d, PROMPTS[1:2], run(llm(d), PROMPTS[1:2]), f"{arch} single")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("c_kernels", ["on", "off"])
def test_batch_and_chunked_prefill(gemma_dir, arch, c_kernels, monkeypatch):
    """Several prompt lengths (most longer than the window) in one batch; then with 16-token prefill
    chunks, so chunks attend to cached context across the window edge. "off": the portable paths
    (gathered decode, SDPA prefill, PyTorch rotary, unpacked weights) that CUDA and CPUs without a
    C compiler take, patched in because the compiled kernels are loaded once per process."""
    if c_kernels == "off":
        import freight.layers.attention as attention
        import freight.layers.rotary as rotary

        monkeypatch.setattr(attention, "paged_decode_available", lambda q: False)
        monkeypatch.setattr(attention, "paged_prefill_available", lambda q, k_cache: False)
        monkeypatch.setattr(rotary, "rotary_inplace", lambda *a: False)
        monkeypatch.setenv("FREIGHT_DISABLE_WEIGHT_PACKING", "1")
    d = gemma_dir(arch)
    check(d, PROMPTS, run(llm(d), PROMPTS), f"{arch} batch (C kernels {c_kernels})")
    check(d, PROMPTS, run(llm(d, max_num_batched_tokens=16), PROMPTS), f"{arch} 16-token chunks ({c_kernels})")


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_small_kv_cache(gemma_dir, arch):
    d = gemma_dir(arch)
    prompts = [prompt(n, seed=100 + n) for n in (20, 35, 28, 41)]
    mem = 10 * kv_bytes_per_block(d, 16)  # 160 tokens of cache for ~220 tokens of work
    engine = llm(d, kv_cache_memory=mem, max_model_len=128, max_num_batched_tokens=32)
    got = run(engine, prompts)
    s = engine.llm_engine.get_stats()
    assert s.num_preemptions > 0, f"expected preemptions with {s.num_total_blocks} blocks, got none"
    check(d, prompts, got, f"{arch} preemption")


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_hit(gemma_dir, arch):
    d = gemma_dir(arch)
    p = prompt(40, seed=7)
    engine = llm(d, enable_prefix_caching=True)
    first = run(engine, [p])
    second = engine.generate([{"prompt_token_ids": p}], _greedy(), use_tqdm=False)[0]
    assert second.num_cached_tokens >= 32, f"no prefix-cache hit: num_cached_tokens={second.num_cached_tokens}"
    check(d, [p, p], [first[0], list(second.outputs[0].token_ids)], f"{arch} prefix cache")


def _greedy():
    from freight import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_parallel_2(gemma_dir, arch):
    d = gemma_dir(arch)
    got = run(llm(d, tensor_parallel_size=2, max_num_batched_tokens=16), PROMPTS)
    check(d, PROMPTS, got, f"{arch} TP=2")
