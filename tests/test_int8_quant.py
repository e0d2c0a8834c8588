"""int8 weight-only quantization (quantization="int8"): the numbers, every matmul path, and the model.

The oracle for the whole model is transformers: its own forward pass, with each projection's weight
replaced by the int8 weight freight stands for (dequantized), must give freight's greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from freight.config import EngineConfig
from freight.kernels.build import reset_kernel_caches
from freight.kernels.cpu_features import supported_isas
from freight.layers.linear import Linear, quantize_linear_weights
from freight.layers.quantization.int8 import Int8Weight, dequantize, quantize_per_channel
from hf_reference import describe_divergence, greedy_with_model, run_greedy

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(params=[*supported_isas(), "pytorch"])
def matmul_path(request, monkeypatch):
    """The int8 kernel as built for one ISA level, or the PyTorch fallback (no C kernels)."""
    if request.param == "pytorch":
        monkeypatch.setenv("FREIGHT_DISABLE_C_KERNELS", "1")
    else:
        monkeypatch.setenv("FREIGHT_KERNEL_ISA", request.param)
    reset_kernel_caches()
    yield request.param
    monkeypatch.undo()
    reset_kernel_caches()


def test_round_trip_error_is_at_most_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    w[3] *= 50  # an outlier row gets its own, larger scale
    w[7] = 0  # an all-zero row stays zero
    q, scales = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (64,)
    assert int(q.abs().max()) == 127 and torch.equal(q[7], torch.zeros_like(q[7]))
    nonzero = torch.arange(64) != 7
    assert torch.equal(q[nonzero].abs().amax(dim=1), torch.full((63,), 127, dtype=torch.int8))
    err = (dequantize(q, scales) - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()
    assert torch.equal(dequantize(q, scales)[7], torch.zeros(96))
    # relative error of a Gaussian row: about (scale/sqrt(12)) / std ~ 1% at 3-4 sigma max
    rel = (dequantize(q, scales) - w).norm(dim=1) / w.norm(dim=1).clamp_min(1e-12)
    assert rel[nonzero].max() < 0.02
    assert dequantize(q, scales, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(48, 64), (40, 36), (24, 37)])  # a partial last tile; odd K
def test_matmul_equals_x_times_dequantized_weight(matmul_path, dtype, n, k):
    g = torch.Generator().manual_seed(n + k)
    weight = Int8Weight(torch.randn(n, k, generator=g))
    # the kernel holds the weight packed wherever it has code: every ISA level but generic
    kernels_on = os.environ.get("FREIGHT_DISABLE_C_KERNELS") != "1"  # the whole run may be without them
    assert (weight.packed is not None) == (kernels_on and matmul_path not in ("generic", "pytorch"))
    w = weight.dequantized().double()
    bias = torch.randn(n, generator=g).to(dtype)
    for rows in (1, 2, 5, 8, 13, 64, 200):
        x = torch.randn(rows, k, generator=g).to(dtype)
        want = x.double() @ w.T + bias.double()
        got = weight.matmul(x, bias)
        assert got.dtype == dtype and got.shape == (rows, n)
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output (and fallback weight) rounded to bf16
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * want.abs().max().item(),
                                   msg=f"{matmul_path} {dtype} rows={rows}")


def test_matmul_takes_strided_and_batched_rows(matmul_path):
    g = torch.Generator().manual_seed(1)
    weight = Int8Weight(torch.randn(32, 40, generator=g))
    wide = torch.randn(6, 50, generator=g)
    x = wide[:, 5:45]  # rows strided by 50: as a slice of a fused output arrives
    torch.testing.assert_close(weight.matmul(x, None), x @ weight.dequantized().T, rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, 40, generator=g)
    torch.testing.assert_close(weight.matmul(x3, None), x3 @ weight.dequantized().T, rtol=1e-5, atol=1e-5)


def test_linear_delegates_to_its_int8_weight(matmul_path):
    torch.manual_seed(0)
    layer = Linear(64, 48, bias=True)
    full = layer.weight.detach().clone()
    layer.quantizable = True
    layer.quantize_int8()
    assert layer.weight.numel() == 0 and layer.held_weight_bytes() == 48 * 64 + 48 * 4
    assert not layer.pack_for_cpu(release_original=True)  # an int8 layer is not packed for oneDNN again
    x = torch.randn(5, 64)
    q, scales = quantize_per_channel(full)
    torch.testing.assert_close(layer(x), F.linear(x, dequantize(q, scales), layer.bias), rtol=1e-5, atol=1e-5)


def _freight_model(model_dir: Path, quantization):
    from freight.model_config import ModelConfig
    from freight.model_loader import load_model

    return load_model(model_dir, ModelConfig.from_dir(model_dir), torch.float32, torch.device("cpu"), "freight",
                      quantization)


def test_only_attention_and_mlp_projections_are_quantized(random_model):
    model = _freight_model(random_model("qwen2_bias"), "int8")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    int8 = {name for name, m in linears.items() if m._int8 is not None}
    assert int8 and all(m.quantizable for name, m in linears.items() if name in int8)
    assert all(name.rpartition(".")[2] in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj") for name in int8)
    assert "lm_head" not in int8
    float_model = _freight_model(random_model("qwen2_bias"), None)
    held = sum(m.held_weight_bytes() for m in linears.values())
    float_bytes = sum(m.in_features * m.out_features * 4 for name, m in float_model.named_modules() if name in int8)
    assert float_bytes / 4 <= held <= float_bytes / 4 * 1.1  # int8 plus one float32 scale per output channel


def _rank_model(model_dir: Path, rank: int, world_size: int):
    """One tensor-parallel rank's int8 model, built in this process (loading runs no collectives)."""
    from freight.distributed import parallel_state as ps

    saved = ps._GROUP
    ps._GROUP = ps.TensorParallelGroup(rank, world_size)
    try:
        return dict(_freight_model(model_dir, "int8").named_modules())
    finally:
        ps._GROUP = saved


def test_each_tensor_parallel_rank_quantizes_its_own_shard(random_model, monkeypatch):
    monkeypatch.setenv("FREIGHT_DISABLE_WEIGHT_PACKING", "1")  # keep the float model's weights readable
    d = random_model("llama_gqa")
    full = _rank_model(d, 0, 1)
    ranks = [_rank_model(d, r, 2) for r in range(2)]
    # gate_up splits output channels: a rank's channels are quantized exactly as in the whole model
    name = "layers.0.mlp.gate_up_proj"
    whole = full[name]._int8.dequantized()
    parts = [r[name]._int8.dequantized().chunk(2) for r in ranks]  # each rank: its gate half, its up half
    assert torch.equal(torch.cat([p[0] for p in parts] + [p[1] for p in parts]), whole)
    # down_proj splits input columns: each rank scales its own half of every row
    name = "layers.0.mlp.down_proj"
    float_down = _freight_model(d, None).get_submodule(name).weight.detach()
    for r, cols in zip(ranks, float_down.chunk(2, dim=1)):
        assert torch.equal(r[name]._int8.dequantized(), dequantize(*quantize_per_channel(cols)))


def test_transformers_backend_refuses_quantization(random_model):
    from freight.model_config import ModelConfig
    from freight.model_loader import load_model

    d = random_model("llama_gqa")
    with pytest.raises(ValueError, match=r"quantization='int8' needs freight's own model class"):
        load_model(d, ModelConfig.from_dir(d), torch.float32, torch.device("cpu"), "transformers", "int8")


def _hf_with_int8_weights(model_dir: Path):
    """transformers' model of model_dir, each projection's weight replaced by its dequantized int8 form."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    replaced = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in PROJECTIONS:
                m.weight.copy_(dequantize(*quantize_per_channel(m.weight)))
                replaced += 1
    assert replaced == 7 * model.config.num_hidden_layers
    return model


@pytest.mark.parametrize("which", ["stories260k", "qwen2_bias"])
def test_greedy_tokens_match_transformers_on_dequantized_weights(which, stories_dir, random_model, make_llm):
    model_dir = stories_dir if which == "stories260k" else random_model(which)
    hf = _hf_with_int8_weights(model_dir)
    llm = make_llm(model_dir, quantization="int8")
    tok = llm.get_tokenizer()
    texts = ["Once upon a time", "The little dog", "Lily and her mom went to the park", "One day"]
    prompts = [tok.encode(t) for t in texts]
    n = 24
    got = run_greedy(llm, prompts, n)  # all prompts in one batch
    problems = [describe_divergence(greedy_with_model(hf, p, n), g, f"prompt#{i}")
                for i, (p, g) in enumerate(zip(prompts, got))]
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


def test_unknown_quantization_is_refused_with_the_supported_list(stories_dir):
    with pytest.raises(ValueError, match=r"quantization 'fp8' is not supported; .* one of: int8"):
        EngineConfig(model="unused", quantization="fp8")
    from freight import LLM

    with pytest.raises(ValueError, match=r"quantization 'int4' is not supported"):
        LLM(model=str(stories_dir), dtype="float32", device="cpu", quantization="int4")


def test_cli_flag():
    from freight.cli.engine_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args(["--model", "m", "-q", "int8"])).quantization == "int8"
    assert engine_config_from_args(parser.parse_args(["--model", "m"])).quantization is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--quantization", "awq"])


def test_prequantized_checkpoint_stays_refused(random_model, tmp_path):
    model_dir = Path(shutil.copytree(random_model("llama_gqa"), tmp_path / "model"))
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    from freight import LLM

    with pytest.raises(ValueError, match=r"quantized with gptq"):
        LLM(model=str(model_dir), dtype="float32", device="cpu", quantization="int8")


def test_quantize_linear_weights_refuses_unknown_method():
    with pytest.raises(ValueError, match="not supported"):
        quantize_linear_weights(torch.nn.Sequential(Linear(4, 4)), "nf4")
