"""Seeded random-weight Hugging Face models saved as real checkpoint folders.

`make_model(dir, arch, **overrides)` writes config.json, generation_config.json,
model.safetensors (float32) and a small byte-level BPE tokenizer, exactly the
files an engine loads from a Hub checkpoint, and returns the folder.

The weights are random but "peaked": norm weights, biases and q/k-norm weights
are set to random non-trivial values (so an engine that ignores them diverges),
and the output projection is scaled so that the logits have a spread of several
nats, which makes greedy decoding robust against float32 rounding differences
between an engine and transformers (top-2 gaps are typically > 0.1).

`VARIANTS` names the configurations the parity tests run; each covers one
feature an engine has to get right (GQA, MQA, tied/untied embeddings, Qwen2 QKV
bias, Qwen3 q/k RMSNorm, llama3 and linear RoPE scaling, explicit head_dim).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3")

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Common settings of every random model; `make_model(**overrides)` replaces them.
_BASE: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    initializer_range=0.15,
    tie_word_embeddings=False,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)

# name -> (arch, overrides). Keep them small: every one is run against HF.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # grouped-query attention (4 query heads, 2 KV heads), untied lm_head
    "llama_gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2)),
    # multi-query attention (1 KV head), tied embeddings, 3 layers
    "llama_mqa_tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True, num_hidden_layers=3)),
    # llama3 RoPE scaling, written in the transformers-4 / Hub style
    # (top-level "rope_scaling" + "rope_theta", as in Llama-3.1 checkpoints),
    # and an explicit head_dim (32) different from hidden/heads (16)
    "llama_rope_llama3": ("llama", dict(
        head_dim=32,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        rope_theta=50000.0,
        _config_style="v4",
    )),
    # linear RoPE scaling (transformers-5 style "rope_parameters")
    "llama_rope_linear": ("llama", dict(
        rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=10000.0,
    )),
    # Mistral: 8 heads / 2 KV heads, head_dim 16 while hidden/heads = 12
    "mistral_gqa": ("mistral", dict(hidden_size=96, num_attention_heads=8, num_key_value_heads=2,
                                    head_dim=16, sliding_window=None)),
    # Mistral with a small sliding window (24 tokens): prompts and generations run past it
    "mistral_swa": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=24, seed=1)),
    # Qwen2: nonzero q/k/v biases, tied embeddings, larger vocab
    "qwen2_bias": ("qwen2", dict(vocab_size=1000, tie_word_embeddings=True, num_key_value_heads=2, seed=2)),
    # Qwen3: q/k RMSNorm with random weights, head_dim 32 != 64/4, MQA-ish 1 KV head
    "qwen3_qknorm": ("qwen3", dict(head_dim=32, num_key_value_heads=1)),
    # Qwen3 with tied embeddings and GQA, 3 layers
    "qwen3_tied": ("qwen3", dict(head_dim=24, num_key_value_heads=2, tie_word_embeddings=True,
                                 num_hidden_layers=3, vocab_size=1000)),
}

# Words for the tokenizer's training corpus and for test prompts.
WORDS = (
    "once upon a time there was a little girl named lily she liked to play outside with her dog "
    "max one day they found a big red ball in the park tom and sam were friends who went to the "
    "sea the sun was warm and the sky was blue mom said be careful and they all smiled happy sad "
    "tree bird fish cat house car boat river forest king queen dragon castle apple cake milk "
    "jump run walk fly swim sing dance read write look see find make take give help love want "
    "the of and to in is was for on with as at by from up out down over under again then"
).split()


def _corpus(seed: int = 0, n_lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines = []
    for _ in range(n_lines):
        words = []
        for _ in range(rng.randint(3, 14)):
            if rng.random() < 0.8:
                words.append(rng.choice(WORDS))
            else:
                words.append("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))))
        line = " ".join(words)
        if rng.random() < 0.3:
            line = line.capitalize() + rng.choice([".", "!", "?", ","])
        lines.append(line)
    return lines


def make_tokenizer(out_dir: Path, vocab_size: int, add_bos: bool = True):
    """Train a byte-level BPE with exactly `vocab_size` tokens and save it in HF form.

    ids: <pad>=0, <s>=1 (BOS), </s>=2 (EOS); BOS is prepended when `add_bos`.
    Saves tokenizer.json, tokenizer_config.json and special_tokens_map.json with a
    minimal chat template. Returns the PreTrainedTokenizerFast.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        add_bos_token=add_bos, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(str(out_dir))
    return fast


_CONFIG_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def build_config(arch: str, **overrides):
    import transformers

    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    kw = dict(_BASE)
    kw.update(overrides)
    kw.pop("_config_style", None)
    kw.pop("seed", None)
    kw.pop("lm_head_scale", None)
    rope_scaling = kw.pop("rope_scaling", None)
    rope_theta = kw.pop("rope_theta", 10000.0)
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = dict(rope_scaling, rope_theta=rope_theta)
    cls = getattr(transformers, _CONFIG_CLASSES[arch][0])
    cfg = cls(rope_parameters=rope, **kw)
    if arch == "qwen2" or arch == "qwen3":
        cfg.use_sliding_window = False
    return cfg


@torch.no_grad()
def _perturb(model, seed: int, lm_head_scale: float, tied_embed_scale: float) -> None:
    """Make every parameter matter: random norm weights, biases and q/k norms."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name or "q_norm" in name or "k_norm" in name:
            # RMSNorm weights around 1 with a real spread (never ~0)
            p.copy_(1.0 + 0.4 * (torch.rand(p.shape, generator=g) * 2 - 1))
        elif name.endswith(".bias"):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    if not model.config.tie_word_embeddings:
        model.lm_head.weight.mul_(lm_head_scale)
    else:
        # With tied embeddings a large input embedding makes the current token
        # win the next argmax (endless repetition): keep the embedding small so
        # the layers dominate the residual stream, and get peaked logits from
        # the final norm's weight instead.
        model.model.embed_tokens.weight.mul_(tied_embed_scale)
        model.model.norm.weight.mul_(lm_head_scale / tied_embed_scale)


def make_model(out_dir, arch: str, seed: int = 0, lm_head_scale: float = 8.0, tied_embed_scale: float = 0.3,
               tokenizer_dir=None, **overrides) -> Path:
    """Build a seeded random `arch` model and save it (float32 safetensors + tokenizer) in out_dir.

    With tokenizer_dir, that real tokenizer (and its chat template) is copied in instead of
    training a small one; the vocabulary then needs to be at least the tokenizer's size."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    style = overrides.get("_config_style", "v5")
    cfg = build_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    _perturb(model, seed, lm_head_scale, tied_embed_scale)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer_dir is None:
        GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(str(out_dir))
        make_tokenizer(out_dir, cfg.vocab_size, add_bos=arch in ("llama", "mistral"))
    else:
        import shutil

        from transformers import AutoTokenizer

        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja"):
                shutil.copy(f, out_dir / f.name)
        tok = AutoTokenizer.from_pretrained(str(out_dir))
        if len(tok) > cfg.vocab_size:
            raise ValueError(f"vocab_size {cfg.vocab_size} is smaller than the tokenizer's {len(tok)} tokens")
        GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(str(out_dir))
    if style == "v4":
        # Rewrite RoPE the way transformers-4 era Hub checkpoints spell it.
        path = out_dir / "config.json"
        d = json.loads(path.read_text())
        rp = d.pop("rope_parameters", None) or {}
        d["rope_theta"] = rp.pop("rope_theta", 10000.0)
        d["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
        path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    return out_dir


def make_variant(root, name: str) -> Path:
    arch, overrides = VARIANTS[name]
    return make_model(Path(root) / name, arch, **overrides)


def kv_bytes_per_block(model_dir, block_size: int, dtype_bytes: int = 4) -> int:
    """KV-cache bytes one block of `block_size` tokens takes for the model in model_dir."""
    d = json.loads((Path(model_dir) / "config.json").read_text())
    heads = d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    return block_size * 2 * d["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes
