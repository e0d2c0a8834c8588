"""The Transformers backend (model_impl="transformers"): transformers' own modelling code on freight's
paged KV cache, continuous batching, chunked prefill, prefix caching and preemption.

Greedy output is compared token for token with transformers' own forward pass
(hf_reference.hf_greedy), as in test_parity_hf.py: on seeded random Llama (GQA) run through
the backend, and on OLMo, an architecture freight has no class of its own for.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from hf_reference import describe_divergence, hf_greedy
from model_factory import BOS_ID, EOS_ID, PAD_ID, _perturb, kv_bytes_per_block, make_tokenizer

pytestmark = pytest.mark.timeout(300)


def _greedy(n: int):
    from freight import SamplingParams
    return SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=n, ignore_eos=True)


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [BOS_ID] + [rng.randrange(3, vocab) for _ in range(n - 1)]


def _check(model_dir, prompts, outs, n: int, label: str) -> None:
    problems = []
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert list(o.prompt_token_ids) == list(p)
        msg = describe_divergence(hf_greedy(model_dir, p, n), list(o.outputs[0].token_ids),
                                  f"{label} prompt#{i} (len {len(p)})")
        if msg:
            problems.append(msg)
    assert not problems, "\n".join(problems)


def _generate(llm, prompts, n):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(n), use_tqdm=False)


@pytest.fixture(scope="module")
def olmo_dir(tmp_path_factory) -> Path:
    """A seeded random tiny OLMo checkpoint (no native freight class) with a small BPE tokenizer."""
    from transformers import AutoModelForCausalLM, GenerationConfig, OlmoConfig

    d = tmp_path_factory.mktemp("olmo")
    cfg = OlmoConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                     initializer_range=0.15, tie_word_embeddings=False, clip_qkv=4.0,
                     bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    _perturb(model, 0, 8.0, 0.3)
    model.save_pretrained(str(d), safe_serialization=True)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(str(d))
    make_tokenizer(d, 512)
    return d


def test_resolve_model_impl():
    from freight.models.transformers_backend import resolve_model_impl

    assert resolve_model_impl("LlamaForCausalLM", "auto") == "freight"
    assert resolve_model_impl("LlamaForCausalLM", "transformers") == "transformers"
    assert resolve_model_impl("OlmoForCausalLM", "auto") == "transformers"
    with pytest.raises(ValueError, match=r"unsupported architecture 'OlmoForCausalLM'; freight supports: "):
        resolve_model_impl("OlmoForCausalLM", "freight")
    with pytest.raises(ValueError, match=r"unsupported architecture 'NoSuchForCausalLM'.*transformers has no"):
        resolve_model_impl("NoSuchForCausalLM", "auto")
    with pytest.raises(ValueError, match="model_impl must be one of"):
        resolve_model_impl("LlamaForCausalLM", "vllm")


def test_attention_backend_required(monkeypatch):
    """A model whose attention does not go through transformers' interface gets a clear error."""
    import transformers

    from freight.models.transformers_backend import resolve_model_impl

    monkeypatch.setattr(transformers.OlmoForCausalLM, "_supports_attention_backend", False)
    with pytest.raises(ValueError, match=r"cannot serve OlmoForCausalLM: .*_supports_attention_backend is False"):
        resolve_model_impl("OlmoForCausalLM", "transformers")


def test_config_validation():
    from freight.config import EngineConfig

    with pytest.raises(ValueError, match="model_impl must be auto, freight or transformers"):
        EngineConfig(model="x", model_impl="hf")
    with pytest.raises(ValueError, match="does not support tensor parallelism"):
        EngineConfig(model="x", model_impl="transformers", tensor_parallel_size=2)


def test_llama_via_backend_chunked_preempted_prefix(make_llm, random_model):
    """Llama (GQA) on the backend: several prompt lengths in one batch, 16-token prefill chunks, a KV
    cache small enough to preempt, then a prefix-cache hit; every output equals transformers' greedy."""
    d = random_model("llama_gqa")
    prompts = [_ids(n, 512, seed=n) for n in (5, 23, 41, 60, 12)]
    llm = make_llm(d, model_impl="transformers", kv_cache_memory=14 * kv_bytes_per_block(d, 16),
                   max_model_len=160, max_num_batched_tokens=16)
    from freight.models.transformers_backend import TransformersForCausalLM
    assert isinstance(llm.llm_engine.engine_core.executor.worker.model, TransformersForCausalLM)
    outs = _generate(llm, prompts, 30)
    _check(d, prompts, outs, 30, "llama/transformers")
    assert llm.llm_engine.get_stats().num_preemptions > 0, "expected preemptions with a 14-block KV cache"
    again = [prompts[3][:48] + _ids(9, 512, seed=99)[1:]]
    outs2 = _generate(llm, again, 10)
    assert outs2[0].num_cached_tokens >= 32, outs2[0].num_cached_tokens
    _check(d, again, outs2, 10, "llama/transformers prefix hit")


def test_olmo_auto_uses_backend(make_llm, olmo_dir, caplog):
    """OLMo has no freight class: auto serves it on the backend and matches transformers."""
    import logging

    prompts = [_ids(n, 512, seed=100 + n) for n in (7, 30, 19)]
    with caplog.at_level(logging.INFO, logger="freight"):
        llm = make_llm(olmo_dir, max_num_batched_tokens=16, max_model_len=128)
    assert "Transformers backend" in caplog.text
    from freight.models.transformers_backend import TransformersForCausalLM
    assert isinstance(llm.llm_engine.engine_core.executor.worker.model, TransformersForCausalLM)
    outs = _generate(llm, prompts, 25)
    _check(olmo_dir, prompts, outs, 25, "olmo/auto")
    text = llm.generate(["Once upon a time"], _greedy(5), use_tqdm=False)[0]
    assert len(text.outputs[0].token_ids) == 5


def test_olmo_freight_impl_raises(olmo_dir):
    from freight import LLM

    with pytest.raises(ValueError, match=r"unsupported architecture 'OlmoForCausalLM'; freight supports"):
        LLM(str(olmo_dir), model_impl="freight", dtype="float32", device="cpu", kv_cache_memory="8MiB")


def test_auto_picks_native_for_llama(random_model, caplog):
    import logging

    from freight.model_config import ModelConfig
    from freight.model_loader import load_model
    from freight.models.llama import LlamaForCausalLM

    d = random_model("llama_gqa")
    with caplog.at_level(logging.INFO, logger="freight"):
        m = load_model(d, ModelConfig.from_dir(d), torch.float32, torch.device("cpu"), "auto")
    assert isinstance(m, LlamaForCausalLM)
    assert "freight (native)" in caplog.text


def test_cli_model_impl_flag():
    import argparse

    from freight.cli.engine_args import add_engine_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config_from_args(p.parse_args(["--model", "x", "--model-impl", "transformers"])).model_impl \
        == "transformers"
    assert engine_config_from_args(p.parse_args(["--model", "x"])).model_impl == "auto"


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_via_backend(make_llm, tmp_path, arch):
    """Gemma 2 (attention and final logit soft-capping, sliding windows) and Gemma 3 (scaled embedding
    buffer, per-layer-type RoPE) through the backend, with chunked prefill."""
    from test_gemma import _build

    d = _build(tmp_path / arch, arch)
    prompts = [_ids(n, 512, seed=200 + n) for n in (6, 21, 35)]
    llm = make_llm(d, model_impl="transformers", max_num_batched_tokens=16, max_model_len=128)
    outs = _generate(llm, prompts, 20)
    _check(d, prompts, outs, 20, f"{arch}/transformers")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_via_backend(make_llm, tmp_path, arch):
    """Mixture of experts through the backend (transformers computes the experts), chunked prefill."""
    from test_moe import VOCAB, make_moe

    d = make_moe(tmp_path / arch, arch)
    prompts = [_ids(n, VOCAB, seed=300 + n) for n in (6, 21, 35)]
    llm = make_llm(d, model_impl="transformers", max_num_batched_tokens=16, max_model_len=128)
    outs = _generate(llm, prompts, 20)
    _check(d, prompts, outs, 20, f"{arch}/transformers")


def test_bench_throughput_model_impl(random_model, tmp_path):
    """`freight bench throughput --model-impl transformers` runs; the native run is reported beside it."""
    import json

    from freight.cli.main import main

    d = random_model("llama_gqa")
    results = {}
    for impl in ("freight", "transformers"):
        out = tmp_path / f"{impl}.json"
        assert main(["bench", "throughput", "--model", str(d), "--model-impl", impl, "--num-prompts", "4",
                     "--input-len", "16", "--output-len", "8", "--dtype", "float32", "--device", "cpu",
                     "--kv-cache-memory", "16MiB", "--num-threads", "1", "--output-json", str(out)]) == 0
        results[impl] = json.loads(out.read_text())
        assert results[impl]["output_tokens"] == 32 and results[impl]["output_tokens_per_s"] > 0
    print({k: round(r["output_tokens_per_s"], 1) for k, r in results.items()})
