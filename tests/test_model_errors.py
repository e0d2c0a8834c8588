"""Models freight cannot run fail early, with a message that says why and what to do.

Each case is checked through the path a user hits (`freight.LLM(dir)`): an unsupported
architecture, a config.json missing a field, a quantized checkpoint, a missing weight,
and PyTorch pickle weights instead of safetensors.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from freight import LLM
from freight.model_config import ModelConfig

GPT2_CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 32, "n_head": 2,
               "n_layer": 1, "n_positions": 64, "vocab_size": 128}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from model_factory import make_model

    return make_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", vocab_size=320, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture
def model_dir(tiny_llama, tmp_path) -> Path:
    """A private copy of the tiny Llama, free to break."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def _edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory="16MiB")


def test_loads_when_intact(model_dir):
    assert _llm(model_dir).generate(["a"])[0].outputs


def test_unsupported_architecture_before_any_field():
    with pytest.raises(ValueError, match=r"unsupported architecture 'GPT2LMHeadModel'; freight supports: .*"
                                         r"LlamaForCausalLM"):
        ModelConfig.from_dict(GPT2_CONFIG)


def test_unsupported_architecture_through_llm(model_dir):
    (model_dir / "config.json").write_text(json.dumps(GPT2_CONFIG))
    with pytest.raises(ValueError, match=r"unsupported architecture 'GPT2LMHeadModel'"):
        _llm(model_dir)


def test_missing_config_key(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg["num_attention_heads"]
    with pytest.raises(ValueError, match=r"config\.json of LlamaForCausalLM lacks 'num_attention_heads'"):
        ModelConfig.from_dict(cfg)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json of LlamaForCausalLM lacks 'num_attention_heads'"):
        _llm(model_dir)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "fp8", "compressed-tensors"])
def test_quantized_checkpoint(model_dir, method):
    _edit_config(model_dir, quantization_config={"quant_method": method, "bits": 4})
    with pytest.raises(ValueError, match=rf"quantized with {re.escape(method)} \(quantization_config in "
                                         r"config\.json\), which freight cannot load; use an unquantized"):
        _llm(model_dir)


def test_missing_weights_named_as_in_checkpoint(model_dir):
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"):
        del tensors[name]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape("lacks weights: ['model.layers.0.mlp.up_proj.weight', "
                                                   "'model.layers.0.self_attn.k_proj.weight', 'model.norm.weight']")):
        _llm(model_dir)


def test_pytorch_pickle_weights(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")  # the contents do not matter
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights .*this directory has PyTorch pickle "
                                                r"weights \(pytorch_model\.bin\); convert them to safetensors"):
        _llm(model_dir)


def test_no_weights_at_all(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights") as e:
        _llm(model_dir)
    assert "pickle" not in str(e.value)
