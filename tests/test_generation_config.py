"""Sampling defaults from a model's generation_config.json, as vLLM takes them.

- which fields become defaults, and from where (--generation-config auto / vllm / DIR,
  --override-generation-config laid over it); bad values fail at start-up;
- a request's own values win, defaults fill only what it leaves unset (0 is a value);
- offline: LLM.generate without sampling_params uses LLM.get_default_sampling_params();
- the server, on the bundled model: greedy completions and chat with the defaults equal
  transformers' greedy generate with the generation config's repetition_penalty, token
  for token, and do not loop; with --generation-config vllm they equal plain greedy.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import httpx
import pytest

from server_utils import clean_server

BUNDLED = Path(__file__).resolve().parent.parent / "freight" / "default_model"
N_TOKENS = 48


def _with_generation_config(src: Path, dst: Path, gen: dict) -> Path:
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(gen))
    return dst


# -- where the defaults come from -------------------------------------------------------------
def test_auto_takes_vllms_fields_only(tmp_path):
    from freight.generation_defaults import diff_sampling_params

    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": False, "temperature": 0.6, "top_k": 20, "top_p": 0.9, "min_p": 0.05,
        "repetition_penalty": 1.1, "max_new_tokens": 7, "eos_token_id": 2, "num_beams": 1}))
    # do_sample is ignored (as in vLLM), max_new_tokens is max_tokens, nothing else is a sampling default.
    assert diff_sampling_params("auto", tmp_path) == {"temperature": 0.6, "top_k": 20, "top_p": 0.9, "min_p": 0.05,
                                                      "repetition_penalty": 1.1, "max_tokens": 7}
    assert diff_sampling_params("vllm", tmp_path) == {}
    assert diff_sampling_params("auto", tmp_path / "nowhere") == {}  # a model without the file: no defaults


def test_directory_and_override(tmp_path):
    from freight.generation_defaults import diff_sampling_params

    model, other = tmp_path / "model", tmp_path / "other"
    model.mkdir(), other.mkdir()
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))
    (other / "generation_config.json").write_text(json.dumps({"top_k": 5}))
    assert diff_sampling_params(str(other), model) == {"top_k": 5}
    assert diff_sampling_params("auto", model, {"temperature": 0.2, "seed": 3}) == {"temperature": 0.2, "top_p": 0.9}
    # As in vLLM, the override applies even with "vllm".
    assert diff_sampling_params("vllm", model, {"max_new_tokens": 9}) == {"max_tokens": 9}
    with pytest.raises(ValueError, match="no generation_config.json"):
        diff_sampling_params(str(tmp_path), model)


def test_bad_settings_fail_at_start(tmp_path, stories_dir):
    from freight.cli.engine_args import add_engine_args, engine_config_from_args
    from freight.config import EngineConfig
    from freight.engine.processor import InputProcessor

    with pytest.raises(ValueError, match="generation_config must be"):
        EngineConfig(model=str(stories_dir), generation_config=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="JSON object"):
        EngineConfig(model=str(stories_dir), override_generation_config=[1])
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--override-generation-config", "[1]"])
    args = parser.parse_args(["--model", str(stories_dir), "--generation-config", "vllm",
                              "--override-generation-config", '{"temperature": 0.5}'])
    config = engine_config_from_args(args)
    assert (config.generation_config, config.override_generation_config) == ("vllm", {"temperature": 0.5})
    bad = EngineConfig(model=str(stories_dir), override_generation_config={"top_p": 0})
    with pytest.raises(ValueError, match="sampling defaults are invalid"):
        InputProcessor(bad, tokenizer=None, vocab_size=10, eos_token_ids=frozenset(), max_model_len=8)


def test_request_values_win_over_defaults():
    from freight.entrypoints.openai.serving_engine import to_sampling_params

    defaults = {"temperature": 0.7, "top_p": 0.95, "repetition_penalty": 1.2, "max_tokens": 30}
    sp = to_sampling_params({"temperature": 0.0, "top_p": None, "max_tokens": 5}, defaults)
    assert (sp.temperature, sp.top_p, sp.repetition_penalty, sp.max_tokens) == (0.0, 0.95, 1.2, 5)
    sp = to_sampling_params({"max_tokens": None, "repetition_penalty": 1.0}, defaults)
    assert (sp.temperature, sp.repetition_penalty, sp.max_tokens) == (0.7, 1.0, 30)


# -- offline ----------------------------------------------------------------------------------
def test_llm_generate_without_params_uses_defaults(stories_dir, tmp_path, make_llm):
    from freight import SamplingParams

    gen = {"do_sample": False, "temperature": 0.0, "repetition_penalty": 1.5, "max_new_tokens": 24}
    model = _with_generation_config(stories_dir, tmp_path / "m", gen)
    prompt = "Once upon a time, there was a little girl named Lily. She liked to play with her ball"
    llm = make_llm(model)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, repetition_penalty=1.5, max_tokens=24)
    implicit = llm.generate([prompt], use_tqdm=False)[0].outputs[0].token_ids
    explicit = llm.generate([prompt], SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=24),
                            use_tqdm=False)[0].outputs[0].token_ids
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0].token_ids
    assert list(implicit) == list(explicit) and len(implicit) == 24
    assert list(plain) != list(implicit), "the repetition penalty changed nothing: the test proves nothing"
    neutral = make_llm(model, generation_config="vllm")
    assert neutral.get_default_sampling_params() == SamplingParams()


# -- the server, on the bundled model -----------------------------------------------------------
def _looping(tokens: list[int], tail: int = 24, max_period: int = 12) -> bool:
    """Whether the last `tail` tokens repeat with a period of at most max_period tokens."""
    end = tokens[-tail:]
    return any(all(end[i] == end[i - p] for i in range(p, len(end))) for p in range(1, max_period + 1))


def _hf_greedy(model, prompt_ids: list[int], repetition_penalty: float) -> list[int]:
    import torch

    with torch.no_grad():
        mask = torch.ones(1, len(prompt_ids), dtype=torch.long)
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=mask,
                             do_sample=False, max_new_tokens=N_TOKENS, repetition_penalty=repetition_penalty,
                             pad_token_id=model.generation_config.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def _completions(srv, prompts: list[list[int]], **extra) -> list[str]:
    body = {"prompt": prompts, "temperature": 0, "max_tokens": N_TOKENS, "ignore_eos": True, **extra}
    r = httpx.post(srv.url("/v1/completions"), json=body, timeout=300)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert r.json()["usage"]["completion_tokens"] == N_TOKENS * len(prompts)
    return [c["text"] for c in choices]


def _chat(srv, messages: list[dict]) -> str:
    body = {"messages": messages, "temperature": 0, "max_tokens": N_TOKENS, "ignore_eos": True}
    r = httpx.post(srv.url("/v1/chat/completions"), json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_server_applies_generation_config_to_greedy_requests(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from freight.generation_defaults import diff_sampling_params

    penalty = diff_sampling_params("auto", BUNDLED).get("repetition_penalty", 1.0)
    if penalty == 1.0:
        pytest.skip("the bundled model's generation_config.json sets no repetition_penalty")
    tok = AutoTokenizer.from_pretrained(BUNDLED)
    model = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: run past end-of-sequence tokens
    prompts = [tok(p).input_ids for p in ("def fibonacci(n):", "class Stack:\n")]
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    chat_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False).input_ids

    def text(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    penalized = [_hf_greedy(model, p, penalty) for p in prompts + [chat_ids]]
    plain = [_hf_greedy(model, p, 1.0) for p in prompts + [chat_ids]]
    for tokens in penalized:
        assert not _looping(tokens), f"greedy with repetition_penalty={penalty} still loops: {text(tokens)!r}"

    with clean_server(BUNDLED, [], tmp_path / "auto.log") as srv:
        got = _completions(srv, prompts)
        got_chat = _chat(srv, messages)
        overridden = _completions(srv, prompts, repetition_penalty=1.0)  # the request's own value wins
    assert got == [text(t) for t in penalized[:2]]
    assert got_chat == text(penalized[2])
    assert overridden == [text(t) for t in plain[:2]]
    log = (tmp_path / "auto.log").read_text()
    assert "default sampling parameters" in log and "repetition_penalty" in log

    with clean_server(BUNDLED, ["--generation-config", "vllm"], tmp_path / "vllm.log") as srv:
        neutral = _completions(srv, prompts)
        neutral_chat = _chat(srv, messages)
    assert neutral == [text(t) for t in plain[:2]]
    assert neutral_chat == text(plain[2])
    assert neutral != got, "the generation config changed nothing: the test proves nothing"
