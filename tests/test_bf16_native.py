"""bfloat16 (and float32) end to end on the CPU's native paths (paged decode and prefill kernels,
small-row matmul, fused elementwise kernels) against transformers run in the same dtype. Run it
with FREIGHT_KERNEL_ISA=avx2 too: the AVX2 kernels then take the same paths.

Two bf16 implementations round differently, so greedy runs may part at a near-tie and then
follow different (equally valid) paths. The check is therefore teacher-forced: transformers
scores freight's own tokens, and at every step the token freight chose must be transformers'
top choice or within BF16_TIE nats of it; its logprob must agree within BF16_LOGPROB. A broken
kernel (a wrong mask, a missed block, a bad chunk offset) shifts logits by whole nats.
"""

import pytest
import torch

from model_factory import make_model
from test_parity_hf import generate, greedy, random_ids

BF16_TIE = 0.3        # nats: a choice this close to the best is a near-tie in bf16
BF16_LOGPROB = 0.3   # nats: sampled-token logprob against transformers' bf16 log_softmax (PyTorch bf16 ops alone differ by up to 0.22)
LM_HEAD_SCALE = 1.5  # logits of a few nats: bf16 resolves them to about 0.02 (at 50 it is 0.25)

# head_dim 64 and sizes that are multiples of 16: the shapes the native kernels take
SHAPE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             intermediate_size=320, vocab_size=512, num_hidden_layers=2)


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16_models")
    return {
        "llama": make_model(root / "llama", "llama", seed=3, lm_head_scale=LM_HEAD_SCALE, **SHAPE),
        "mistral_swa": make_model(root / "mistral", "mistral", seed=4, sliding_window=40, lm_head_scale=LM_HEAD_SCALE, **SHAPE),
    }


def _native_kernels_present():
    """With AVX512_BF16 all the bf16 kernels run; at FREIGHT_KERNEL_ISA=avx2 the AVX2 decode and
    matmul kernels (bf16 widened to float32) do, and prefill attention stays on SDPA."""
    from freight.kernels import paged_decode_available

    return paged_decode_available(torch.zeros(1, 4, 64, dtype=torch.bfloat16))


def _check_teacher_forced(model_dir, prompt, out, label, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    c = out.outputs[0]
    ids = torch.tensor([list(prompt) + list(c.token_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    problems = []
    for i, (tok, lps) in enumerate(zip(c.token_ids, c.logprobs)):
        best = logits[i].max().item()
        if logits[i, tok].item() < best - BF16_TIE:
            problems.append(f"step {i}: chose {tok} at {logits[i, tok].item():.3f}, HF best "
                            f"{logits[i].argmax().item()} at {best:.3f}")
        got = lps[tok]
        got = getattr(got, "logprob", got)
        if abs(got - logp[i, tok].item()) > BF16_LOGPROB:
            problems.append(f"step {i}: logprob {got:.3f} vs HF {logp[i, tok].item():.3f}")
    assert not problems, f"{label}: " + "; ".join(problems[:5])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])  # float32: the AVX2 kernels' own dtype
@pytest.mark.parametrize("model", ["llama", "mistral_swa"])
def test_native_paths_follow_transformers(make_llm, bf16_models, model, dtype):
    if not _native_kernels_present():
        pytest.skip("no C compiler (or FREIGHT_DISABLE_C_KERNELS=1): the native bf16 kernels do not run here")
    d = bf16_models[model]
    # a small token budget splits prompts into chunks that attend to earlier chunks in the cache;
    # the shared start makes the second round hit the prefix cache
    base = random_ids(50, 512, seed=5)
    prompts = [base + random_ids(n, 512, seed=n) for n in (3, 30, 77)] + [random_ids(9, 512, seed=9)]
    # the CPU's paths whatever FREIGHT_TEST_DEVICE says: they are what this test is about
    llm = make_llm(d, dtype=dtype, device="cpu", max_num_batched_tokens=48, enable_prefix_caching=True)
    for round_ in range(2):
        outs = generate(llm, [{"prompt_token_ids": p} for p in prompts], greedy(40, logprobs=0))
        for p, o in zip(prompts, outs):
            _check_teacher_forced(d, p, o, f"{model} {dtype} round {round_} prompt len {len(p)}",
                                  getattr(torch, dtype))
    assert llm.llm_engine.get_stats().prefix_cache_hits > 0


def test_dtype_auto_follows_the_cpus_native_bf16(make_llm, bf16_models, tmp_path, monkeypatch):
    """A bf16 checkpoint runs in bf16 where the CPU has it, in float32 on an AVX2-level CPU
    (emulated here with FREIGHT_KERNEL_ISA=avx2, which the engine's processes inherit)."""
    import json
    import shutil

    from freight.kernels.cpu_features import has_native_bf16

    d = tmp_path / "bf16_checkpoint"
    shutil.copytree(bf16_models["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    (d / "config.json").write_text(json.dumps(cfg))
    want = "bfloat16" if has_native_bf16() else "float32"
    assert str(make_llm(d, dtype="auto", device="cpu").llm_engine.dtype).removeprefix("torch.") == want
    monkeypatch.setenv("FREIGHT_KERNEL_ISA", "avx2")
    assert str(make_llm(d, dtype="auto", device="cpu").llm_engine.dtype).removeprefix("torch.") == "float32"
