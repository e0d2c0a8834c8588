"""The native decode driver (freight/kernels/decode_layers.c) against the Python layer loop.

It runs the very kernels the Python path calls, in the same order, so a decode step must give
bit-identical logprobs and tokens either way (FREIGHT_FUSED_DECODE=0 turns it off); both paths are
also checked against transformers by the parity tests. Models it does not cover must fall back.
"""

from __future__ import annotations

import os
import random

import pytest

from freight.sampling_params import SamplingParams


def _model(llm):
    return llm.llm_engine.engine_core.executor.worker.model_runner.model


def _run(llm, vocab: int) -> list:
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))]} for _ in range(5)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    got = []
    for batch in (prompts[:1], prompts[:3], prompts):  # single stream, then decode steps of 3 and 5 rows
        for out in llm.generate(batch, params, use_tqdm=False):
            c = out.outputs[0]
            got.append((c.token_ids, [sorted(d.items()) for d in c.logprobs]))
    return got


@pytest.mark.parametrize("name", ["llama_gqa", "llama_mqa_tied", "llama_rope_llama3", "mistral_gqa", "qwen2_bias"])
@pytest.mark.parametrize("dtype,quantization", [("bfloat16", None), ("float32", None), ("bfloat16", "int8")])
def test_fused_decode_is_bit_identical(random_model, make_llm, monkeypatch, isa, name, dtype, quantization):
    d = random_model(name)
    runs = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("FREIGHT_FUSED_DECODE", fused)
        llm = make_llm(d, dtype=dtype, quantization=quantization)
        runs[fused] = _run(llm, llm.llm_engine.model_config.vocab_size)
        model = _model(llm)
        # (the generic build has no gemm.c, and FREIGHT_DISABLE_C_KERNELS=1 none: the Python path runs either way)
        used = fused == "1" and isa != "generic" and os.environ.get("FREIGHT_DISABLE_C_KERNELS") != "1"
        assert (model._fused is not None) == used, "the native driver was not (or wrongly) used"
        assert not used or model._fused.int8 == (quantization == "int8")
    assert runs["1"] == runs["0"]


@pytest.mark.parametrize("name", ["qwen3_qknorm", "mistral_swa"])
def test_models_it_does_not_cover_fall_back(random_model, make_llm, name):
    """q/k norms and sliding windows are not in the driver: the Python path runs them."""
    llm = make_llm(random_model(name), dtype="bfloat16")
    _run(llm, llm.llm_engine.model_config.vocab_size)
    model = _model(llm)
    assert model._fused is None and model._fused_checked


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_mixed_steps_and_speculation_are_bit_identical(random_model, make_llm, monkeypatch, dtype):
    """Steps with prefill chunks (small prompts joining running decodes, chunked prefill, speculative
    verification) through the driver's prefill-kernel branch: the same as the Python path."""
    d = random_model("llama_rope_llama3")  # head_dim 32: the prefill kernel's shapes
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
    rng = random.Random(1)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 40) for _ in range(rng.randint(3, 30))]} for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    runs = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("FREIGHT_FUSED_DECODE", fused)
        llm = make_llm(d, dtype=dtype, max_num_batched_tokens=16, speculative_config=spec)
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[fused] = [(o.outputs[0].token_ids, [sorted(x.items()) for x in o.outputs[0].logprobs]) for o in outs]
        assert llm.llm_engine.get_stats().spec_decoding.num_drafts > 0
    assert runs["1"] == runs["0"]
