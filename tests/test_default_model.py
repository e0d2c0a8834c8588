"""The bundled default model (freight/default_model) and the script that trains it.

- the training script still runs end to end (a few steps on a tiny slice of the
  stdlib) and writes a directory transformers loads;
- the bundled model is complete, small, loads in transformers and completes
  Python code;
- freight's greedy output on it equals transformers' token for token;
- LLM() with no model uses it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TEST_THREADS

SCRIPT = REPO_ROOT / "scripts" / "train_default_model.py"
PROMPT = "def fibonacci(n):"
N_TOKENS = 48
REQUIRED_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json", "README.md"]


def _default_dir() -> Path:
    from freight.model_dir import default_model_path

    return Path(default_model_path())


def _hf_greedy(model_dir: Path, prompt: str, n: int, repetition_penalty: float = 1.0) -> tuple[list[int], list[int]]:
    """(prompt ids, new token ids) from transformers' greedy generate in float32 (plain greedy unless a
    repetition penalty is given, whatever generation_config.json sets)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Like freight's ignore_eos: run past end-of-sequence tokens without suppressing them.
    model.generation_config.eos_token_id = None
    ids = tok(prompt).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n,
                             repetition_penalty=repetition_penalty,
                             pad_token_id=tok.pad_token_id)
    return ids, out[0, len(ids):].tolist()


# --------------------------------------------------------------------------- training script


def test_training_script_tiny(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--threads", "1", "--seed", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in REQUIRED_FILES + ["training_report.json"]:
        assert (out / name).is_file(), f"training script did not write {name}"

    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] == 5
    assert report["heldout_tokens_scored"] > 0
    for key in ("heldout_loss", "unigram_loss"):
        assert 0 < report[key] < 20, report[key]
    card = (out / "README.md").read_text()
    assert "held-out" in card.lower() and "unigram" in card.lower()

    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen_cfg["eos_token_id"]
    assert tok.eos_token == "<|endoftext|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # Byte-level BPE: any text round-trips.
    s = "def f(x):\n    return x  # \u00e9\u4e2d\n"
    assert tok.decode(tok(s).input_ids) == s

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert model.config.vocab_size == len(tok)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_training_script_reproducible(tmp_path):
    """Same seed, same data, same threads -> identical weights."""
    from safetensors.torch import load_file

    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        subprocess.run(
            [sys.executable, str(SCRIPT), "--tiny", "--max-steps", "3", "--out", str(out), "--threads", "1",
             "--seed", "7", "--sample-tokens", "1"],
            cwd=REPO_ROOT, check=True, capture_output=True, timeout=300,
        )
        outs.append(load_file(out / "model.safetensors"))
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        assert (outs[0][k] == outs[1][k]).all(), k


# --------------------------------------------------------------------------- bundled model


def test_bundled_model_files():
    d = _default_dir()
    assert d.is_absolute() and d.name == "default_model"
    for name in REQUIRED_FILES:
        assert (d / name).is_file(), f"bundled model lacks {name}"
    total = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    assert total < 20 * 1024 * 1024, f"bundled model is {total / 1e6:.1f} MB (limit 20 MB)"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "chat_template" in json.loads((d / "tokenizer_config.json").read_text())
    report = json.loads((d / "training_report.json").read_text())
    # The acceptance bar: clearly better than a unigram model of the same tokenizer.
    assert report["heldout_loss"] < report["unigram_loss"] - 1.0, report
    card = (d / "README.md").read_text()
    assert f"{report['heldout_loss']:.3f}" in card and f"{report['unigram_loss']:.3f}" in card


def test_bundled_model_completes_python():
    """Greedy under the shipped generation defaults (what `freight serve` applies) reads like code."""
    from transformers import AutoTokenizer

    d = _default_dir()
    penalty = json.loads((d / "generation_config.json").read_text()).get("repetition_penalty", 1.0)
    _, new = _hf_greedy(d, PROMPT, N_TOKENS, repetition_penalty=penalty)
    text = AutoTokenizer.from_pretrained(d).decode(new, skip_special_tokens=True)
    assert "\n    " in text, f"no indented block in {text!r}"
    keywords = {"return", "if", "for", "while", "def", "in", "else", "not", "None", "self", "import", "raise"}
    words = set(text.replace("(", " ").replace(")", " ").replace(":", " ").split())
    assert words & keywords, f"no Python keywords in {text!r}"


def test_bundled_model_greedy_matches_transformers(make_llm):
    from freight import SamplingParams

    d = _default_dir()
    prompt_ids, hf_new = _hf_greedy(d, PROMPT, N_TOKENS)
    llm = make_llm(d, dtype="float32")
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True))
    assert list(out[0].prompt_token_ids) == prompt_ids
    assert list(out[0].outputs[0].token_ids) == hf_new


def test_llm_without_model_uses_bundled():
    from freight import LLM, SamplingParams

    llm = LLM(dtype="float32", kv_cache_memory="16MiB")
    import torch

    torch.set_num_threads(TEST_THREADS)  # the engine sets every core; undo that for the shared machine
    assert Path(llm.llm_engine.model_dir).resolve() == _default_dir().resolve()
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert out[0].outputs[0].text.strip()
