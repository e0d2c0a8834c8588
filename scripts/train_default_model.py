#!/usr/bin/env python
"""Train freight's bundled default model: a small Llama-architecture causal LM.

The training data is text every machine with Python already has: the Python
standard library's own sources (code, comments and docstrings) plus the
``pydoc_data`` help topics. Nothing is downloaded.

What it does, in order:

1. Collects documents: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]``
   (site-packages, ``__pycache__``, the ``encodings`` code tables and a few
   non-UTF-8 test data folders excluded), each ``pydoc_data`` topic as a ChatML
   conversation ("Explain the Python topic ...") and, from non-test modules,
   each documented function as a ChatML conversation (request built from the
   docstring's summary, answer = the function's source). The chat documents
   teach the model the chat template and to end its turn with ``<|im_end|>``.
2. Splits them deterministically into train and held-out by a hash of the
   document's name (about 2% held out; every document derived from a held-out
   file is held out too).
3. Trains a byte-level BPE tokenizer (``tokenizers``) on the train split.
4. Trains ``transformers.LlamaForCausalLM`` with AdamW, linear warmup and a
   cosine schedule, on packed sequences of ``--seq-len`` tokens.
5. Measures the held-out loss, and the loss of a unigram model of the same
   tokenizer (train-split token frequencies, add-one smoothing) on the same
   held-out tokens, for comparison.
6. Writes a standard Hugging Face model directory (config.json,
   model.safetensors, tokenizer.json, tokenizer_config.json with a ChatML chat
   template, generation_config.json), ``training_report.json`` and a model card
   README.md with greedy sample completions.

Reproducible from ``--seed`` given the same Python version (its stdlib is the
data), the same library versions, ``--threads``, ``--max-steps`` and hardware.
With ``--minutes`` alone (no ``--max-steps``) the step count is estimated from
the measured speed of the first steps, which is not reproducible across runs.

The bundled model in ``freight/default_model`` was made with::

    python scripts/train_default_model.py --out freight/default_model \\
        --threads 1 --seed 0 --max-steps 1800 --minutes 58

(the exact command, timings and losses are recorded in its model card and
training_report.json).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOT, IM_START, IM_END = SPECIAL_TOKENS

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Directories (relative to the stdlib root) that are not useful training text.
EXCLUDED_DIRS = {
    "site-packages",
    "dist-packages",
    "__pycache__",
    "encodings",  # mostly generated code-page tables
    "pydoc_data",  # its topics are added as conversations instead
    "config-3",  # build configuration
}
EXCLUDED_PREFIXES = (
    "lib2to3/tests/data",  # Python 2 code and deliberately broken files
    "test/badsyntax",
    "test/bad_",
    "test/tokenizedata",
    "test/encoded_modules",
)

DEFAULT_SAMPLE_PROMPTS = [
    "def fibonacci(n):",
    "import os\n",
    "class Stack:",
    "def read_json(path):\n    \"\"\"",
]


# --------------------------------------------------------------------------- data


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def list_source_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in EXCLUDED_DIRS and not d.startswith("config-") and not d.startswith(".")
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel.startswith(EXCLUDED_PREFIXES):
                continue
            files.append(root / rel)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def chat(user: str, assistant: str) -> str:
    return f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{assistant}{IM_END}\n"


def function_conversations(source: str, max_chars: int = 2000) -> list[str]:
    """ChatML documents pairing a documented function's summary with its source."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.name.startswith("_"):
            continue
        summary = doc.strip().split("\n\n")[0].strip()
        if len(summary) < 20:
            continue
        start = node.lineno - 1
        if node.decorator_list:
            start = min(d.lineno for d in node.decorator_list) - 1
        body = textwrap.dedent("".join(lines[start : node.end_lineno])).rstrip()
        if len(body) > max_chars:
            continue
        out.append(
            chat(
                f"Write a Python function `{node.name}`: {summary}",
                f"```python\n{body}\n```",
            )
        )
    return out


def pydoc_topic_conversations() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped-down Python
        return []
    docs = []
    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            docs.append((f"pydoc_data/topics/{key}", chat(f"Explain the Python topic '{key}'.", text)))
    return docs


def is_heldout(name: str, heldout_permille: int) -> bool:
    h = int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16)
    return h % 1000 < heldout_permille


def collect_documents(
    root: Path,
    heldout_permille: int = 20,
    max_files: int | None = None,
    max_bytes: int | None = None,
    with_chat: bool = True,
) -> tuple[list[str], list[str], dict]:
    """Returns (train_docs, heldout_docs, stats). Order is deterministic."""
    train: list[str] = []
    heldout: list[str] = []
    stats = {"files": 0, "heldout_files": 0, "bytes": 0, "function_chats": 0, "topic_chats": 0, "skipped_files": 0}
    files = list_source_files(root)
    if max_files is not None:
        # An even spread over the tree rather than the first few directories.
        step = max(1, len(files) // max_files)
        files = files[::step][:max_files]
    total = 0
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            stats["skipped_files"] += 1
            continue
        if not text.strip():
            continue
        if max_bytes is not None and total + len(text) > max_bytes and total > 0:
            break
        total += len(text)
        held = is_heldout(rel, heldout_permille)
        target = heldout if held else train
        target.append(text)
        stats["files"] += 1
        stats["heldout_files"] += int(held)
        if with_chat and not rel.startswith(("test/", "idlelib/idle_test/", "unittest/test/")):
            convs = function_conversations(text)
            target.extend(convs)
            stats["function_chats"] += len(convs)
    if with_chat and max_files is None and max_bytes is None:
        for name, doc in pydoc_topic_conversations():
            (heldout if is_heldout(name, heldout_permille) else train).append(doc)
            stats["topic_chats"] += 1
    if not heldout and len(train) > 1:  # tiny slices: keep a held-out split anyway
        heldout.append(train.pop())
    stats["train_docs"] = len(train)
    stats["heldout_docs"] = len(heldout)
    stats["train_chars"] = sum(len(d) for d in train)
    stats["heldout_chars"] = sum(len(d) for d in heldout)
    stats["bytes"] = total
    return train, heldout, stats


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(train_docs: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # GPT-2's byte-level split, but with every newline a token of its own: then
    # "\n" never merges with the next line's indentation, so a prompt that ends
    # in a newline is tokenized the way the training text was.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer, length=len(train_docs))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=None,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_docs(tokenizer, docs: list[str]):
    """Concatenate docs, each followed by <|endoftext|>, into one int64 tensor."""
    import torch

    eot = tokenizer.convert_tokens_to_ids(EOT)
    encs = tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    ids: list[int] = []
    for enc in encs:
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def unigram_loss(train_ids, heldout_targets, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under the train-split unigram
    distribution with add-one (Laplace) smoothing over the whole vocabulary."""
    import torch

    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return float(-logp[heldout_targets].mean())


# --------------------------------------------------------------------------- model


def build_model(args, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.hidden_size // args.num_heads,
        max_position_embeddings=args.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        initializer_range=0.02,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    # GPT-2 style: scale the init of residual-branch output projections by depth.
    std = 0.02 / math.sqrt(2 * args.num_layers)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.normal_(0.0, std)
            layer.mlp.down_proj.weight.normal_(0.0, std)
    return model


def lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_chunks(ids, seq_len: int):
    """Non-overlapping windows of seq_len + 1 tokens (input + shifted target)."""
    n = (len(ids) - 1) // seq_len
    if n == 0:  # tiny corpora: pad by repeating
        reps = (seq_len + 1) // max(1, len(ids)) + 1
        ids = ids.repeat(reps)
        n = (len(ids) - 1) // seq_len
    starts = [i * seq_len for i in range(n)]
    return ids, starts


def evaluate(model, ids, seq_len: int, autocast, max_tokens: int | None = None, batch_size: int = 16):
    """Mean next-token cross-entropy (nats) over the stream, in windows of seq_len.

    Returns (loss, target_tensor) where target_tensor holds every scored token."""
    import torch
    import torch.nn.functional as F

    ids, starts = make_chunks(ids, seq_len)
    if max_tokens is not None:
        starts = starts[: max(1, max_tokens // seq_len)]
    total, count = 0.0, 0
    targets = []
    model.eval()
    with torch.no_grad():
        for b in range(0, len(starts), batch_size):
            batch = torch.stack([ids[s : s + seq_len + 1] for s in starts[b : b + batch_size]])
            x, y = batch[:, :-1], batch[:, 1:]
            with autocast():
                logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
            total += float(loss)
            count += y.numel()
            targets.append(y.reshape(-1))
    model.train()
    return total / max(1, count), torch.cat(targets)


# --------------------------------------------------------------------------- output


def write_tokenizer_config(out_dir: Path, tokenizer, model_max_length: int) -> None:
    """A tokenizer_config.json that transformers 4.x and 5.x both read, with the
    chat template inside it (transformers 5 otherwise writes chat_template.jinja)."""
    added = {
        str(tokenizer.convert_tokens_to_ids(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    jinja = out_dir / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()


# Prompts for the repetition measure (repeated_ngram_fraction): code openings of several kinds.
REPETITION_PROMPTS = DEFAULT_SAMPLE_PROMPTS + [
    "def main():", "for i in range(10):", "class Config:\n    def __init__(self", "# Parse the command line\n",
    "def is_prime(n):", "try:\n", "with open(path) as f:\n", "def add(a, b):",
]
REPETITION_PENALTIES = (1.0, 1.2, 1.3, 1.4, 1.5)


def repeated_ngram_fraction(model, tokenizer, max_new_tokens: int, n: int = 4) -> dict[str, float]:
    """Per repetition penalty: the mean fraction of greedy output n-grams that repeat an earlier one
    (0: no loops; a model stuck in one loop scores close to 1). Chose the shipped penalty."""
    import torch

    result = {}
    for penalty in REPETITION_PENALTIES:
        fractions = []
        for prompt in REPETITION_PROMPTS:
            enc = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(**enc, do_sample=False, repetition_penalty=penalty,
                                     max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            ids = gen[0, enc["input_ids"].shape[1]:].tolist()
            grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
            fractions.append(1 - len(set(grams)) / len(grams) if grams else 0.0)
        result[str(penalty)] = sum(fractions) / len(fractions)
    return result


# What generation_config.json asks for: a model this small loops under plain greedy decoding
# ("import os\nimport os\n..."); a repetition penalty breaks the loops, and a temperature gives
# sampled output some variety. Servers honour these unless a request sets its own
# (freight serve --generation-config auto, as vLLM).
GENERATION_DEFAULTS = dict(temperature=0.7, top_p=0.95, repetition_penalty=1.4)


def greedy_samples(
    model, tokenizer, prompts: list[str], max_new_tokens: int, sample_seed: int | None = None,
    repetition_penalty: float = 1.0,
) -> list[dict]:
    """Greedy completions, or with sample_seed set, sampled ones (the generation defaults)."""
    import torch

    model.eval()
    out = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        if sample_seed is None:
            kw = dict(do_sample=False, repetition_penalty=repetition_penalty)
        else:
            torch.manual_seed(sample_seed)
            kw = dict(do_sample=True, top_k=0, **GENERATION_DEFAULTS)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                **kw,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        completion = tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=False)
        out.append({"prompt": prompt, "completion": completion})
    return out


def write_model_card(out_dir: Path, report: dict) -> None:
    r = report
    shape = r["model"]
    lines = [
        "---",
        "license: apache-2.0",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [freight, llama, python, code, tiny]",
        "---",
        "",
        "# freight default model",
        "",
        "A tiny Llama-architecture causal language model bundled with freight so that",
        "`freight serve` and `LLM()` work on a fresh machine with no network access.",
        "It is a toy: it writes Python-looking code, not correct programs.",
        "",
        "## Data",
        "",
        f"The Python {r['python_version']} standard library on the training machine "
        f"(`sysconfig.get_paths()['stdlib']`, site-packages excluded): {r['data']['files']} `.py` files "
        f"({r['data']['bytes'] / 1e6:.1f} MB of source code, comments and docstrings), plus "
        f"{r['data']['topic_chats']} `pydoc_data` help topics and {r['data']['function_chats']} "
        "documented functions formatted as ChatML conversations (docstring summary -> function source). "
        "The training text is Python's own, under the PSF license.",
        f"About 2% of files/topics (by a hash of their path) are held out: {r['data']['heldout_docs']} documents, "
        f"{r['heldout_tokens']:,} tokens. Train split: {r['train_tokens']:,} tokens.",
        "",
        "## Model",
        "",
        f"- Architecture: `LlamaForCausalLM`, {shape['num_layers']} layers, hidden {shape['hidden_size']}, "
        f"MLP {shape['intermediate_size']}, {shape['num_heads']} heads / {shape['num_kv_heads']} KV heads "
        f"(head dim {shape['hidden_size'] // shape['num_heads']}), context {shape['seq_len']} tokens, tied embeddings.",
        f"- Parameters: {r['params']:,} ({r['params'] / 1e6:.2f} M), stored as {r['save_dtype']} "
        f"({r['weights_bytes'] / 1e6:.1f} MB).",
        f"- Tokenizer: byte-level BPE (`tokenizers`), vocabulary {r['vocab_size']}, trained on the train split. "
        "Special tokens `<|endoftext|>` (end of document, eos, pad), `<|im_start|>`, `<|im_end|>`; "
        "ChatML chat template. No BOS token is added.",
        "",
        "## Training",
        "",
        f"- Script: `scripts/train_default_model.py` (in the freight repository), seed {r['seed']}.",
        f"- Command: `{r['command']}`"
        + (f" (to reproduce these weights exactly: `{r['reproduce_command']}`)" if r["reproduce_command"] != r["command"] else ""),
        f"- {r['steps']} steps" + (f" (of {r['planned_steps']} in the LR schedule; stopped early by the time cap)" if r["steps"] < r["planned_steps"] else "") + f" of {r['batch_size']} x {shape['seq_len']} tokens "
        f"({r['tokens_trained']:,} tokens, {r['tokens_trained'] / max(1, r['train_tokens']):.2f} epochs), "
        f"AdamW (lr {r['lr']}, warmup {r['warmup_steps']}, cosine to {r['min_lr_ratio']} x), "
        f"weight decay {r['weight_decay']}, grad clip 1.0, {r['amp']} autocast.",
        f"- Training time: {r['train_time_s'] / 60:.1f} minutes on {r['threads']} CPU thread(s) "
        f"({r['cpu']}), {r['tokens_per_s']:.0f} tokens/s; total script time {r['total_time_s'] / 60:.1f} minutes.",
        f"- torch {r['torch_version']}, transformers {r['transformers_version']}, tokenizers {r['tokenizers_version']}.",
        "",
        "## Evaluation (held-out split)",
        "",
        "| model | held-out loss (nats/token) | perplexity |",
        "|---|---|---|",
        f"| this model | {r['heldout_loss']:.3f} | {math.exp(r['heldout_loss']):.1f} |",
        f"| unigram model, same tokenizer (train counts, add-one smoothing) | {r['unigram_loss']:.3f} | "
        f"{math.exp(r['unigram_loss']):.1f} |",
    ]
    prev = r.get("previous")
    if prev:
        lines += [
            f"| the model this one replaced ({prev['steps']} steps, {prev['tokens_trained']:,} tokens, "
            f"{prev['train_time_s'] / 60:.1f} min on {prev['threads']} thread(s)) | {prev['heldout_loss']:.3f} | "
            f"{math.exp(prev['heldout_loss']):.1f} |",
        ]
    lines += [
        "",
        f"That is {r['heldout_loss'] * r['heldout_tokens'] / r['data']['heldout_chars'] / math.log(2):.2f} bits per "
        f"character for this model and {r['unigram_loss'] * r['heldout_tokens'] / r['data']['heldout_chars'] / math.log(2):.2f} "
        f"for the unigram model. Train loss at the end (mean of the last 50 steps): {r['final_train_loss']:.3f}.",
        "",
        f"## Sample completions (greedy, transformers, {r.get('sample_tokens', 64)} new tokens)",
        "",
    ]
    def show(samples):
        out = []
        for s in samples:
            out += [
                f"Prompt `{json.dumps(s['prompt'])[1:-1]}`:",
                "",
                "```python",
                (s["prompt"] + s["completion"]).replace("```", "'''"),
                "```",
                "",
            ]
        return out

    lines += show(r["samples"])
    defaults = r.get("generation_defaults", {})
    if r.get("samples_penalized"):
        lines += [
            f"## Greedy with the shipped repetition penalty ({defaults.get('repetition_penalty')}, transformers)",
            "",
            "Plain greedy decoding of a model this small falls into loops. `generation_config.json` ships "
            f"`{json.dumps(defaults)}`, which servers apply unless a request sets its own "
            "(`freight serve --generation-config auto`, vLLM's default), so a greedy request to "
            "`freight serve` reads like this:",
            "",
        ]
        rep = r.get("repeated_4gram_fraction")
        if rep:
            lines += [
                f"The penalty was chosen by how often greedy output repeats itself: the mean fraction of "
                f"repeated 4-grams in {r.get('sample_tokens', 64)} greedy tokens from "
                f"{len(REPETITION_PROMPTS)} code prompts, by repetition penalty: "
                + ", ".join(f"{k}: {v:.3f}" for k, v in rep.items()) + ".",
                "",
            ]
        lines += show(r["samples_penalized"])
    if r.get("samples_sampled"):
        lines += [
            f"## Sampled completions (the generation defaults, torch seed {r['seed']}, transformers)",
            "",
        ]
        lines += show(r["samples_sampled"])
    lines += [
        "## Limitations",
        "",
        "Tiny and trained for minutes: expect plausible syntax and stdlib idioms,",
        "frequent repetition under greedy decoding, wrong logic, and no real",
        "instruction following. Use it to exercise freight, not for answers.",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch/tokenizers threads (default: all cores)")
    p.add_argument("--minutes", type=float, default=40.0, help="wall-clock cap on the training loop")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (sets the LR schedule; reproducible)")
    p.add_argument(
        "--stop-after-steps",
        type=int,
        default=None,
        help="stop after N steps without changing the LR schedule set by --max-steps "
        "(replays a run that --minutes cut short; the report's reproduce_command uses it)",
    )
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=768)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 3%% of steps, at least 1")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--amp", choices=["bf16", "none"], default="bf16", help="bf16 autocast for matmuls (CPU)")
    p.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--heldout-permille", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-tokens", type=int, default=400_000, help="cap on held-out tokens scored at the end")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--max-files", type=int, default=None, help="use only N files (spread over the tree)")
    p.add_argument("--max-bytes", type=int, default=None, help="stop collecting after this many characters")
    p.add_argument("--no-chat", action="store_true", help="skip the ChatML documents")
    p.add_argument("--sample-tokens", type=int, default=64)
    p.add_argument("--previous-report", default=None,
                   help="training_report.json of the model this one replaces (compared in the card)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="smoke-test preset: 8 files, vocab 384, 2 layers of width 64, seq 64, 5 steps",
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.max_files = args.max_files or 8
        args.vocab_size, args.hidden_size, args.intermediate_size = 384, 64, 128
        args.num_layers, args.num_heads, args.num_kv_heads = 2, 4, 2
        args.seq_len, args.batch_size = 64, 4
        args.max_steps = args.max_steps or 5
        args.eval_tokens, args.eval_every, args.log_every = 2048, 0, 1
        args.sample_tokens = 16
    if args.hidden_size % args.num_heads or args.num_heads % args.num_kv_heads:
        p.error("hidden-size must divide by num-heads, and num-heads by num-kv-heads")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    os.environ.setdefault("RAYON_RS_NUM_CPUS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if args.threads > 1 else "false")
    import contextlib
    import random

    import numpy as np
    import tokenizers
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import GenerationConfig

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- data
    root = stdlib_root()
    train_docs, heldout_docs, data_stats = collect_documents(
        root, args.heldout_permille, args.max_files, args.max_bytes, with_chat=not args.no_chat
    )
    log(f"data from {root}: {json.dumps(data_stats)}")
    if not train_docs or not heldout_docs:
        raise SystemExit("no training data found")

    # ---- tokenizer
    tokenizer = train_tokenizer(train_docs, args.vocab_size)
    train_ids = encode_docs(tokenizer, train_docs)
    heldout_ids = encode_docs(tokenizer, heldout_docs)
    vocab = len(tokenizer)
    log(
        f"tokenizer: vocab {vocab}; train {len(train_ids):,} tokens "
        f"({data_stats['train_chars'] / len(train_ids):.2f} chars/token), held-out {len(heldout_ids):,} tokens"
    )

    # ---- model
    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters ({args.num_layers}L h{args.hidden_size} mlp{args.intermediate_size} heads {args.num_heads}/{args.num_kv_heads})")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 and "embed" not in name else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    if args.amp == "bf16":
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext

    stream, starts = make_chunks(train_ids, args.seq_len)
    gen = torch.Generator().manual_seed(args.seed)
    order: list[int] = []

    def next_batch():
        nonlocal order
        rows = []
        for _ in range(args.batch_size):
            if not order:
                order = torch.randperm(len(starts), generator=gen).tolist()
            s = starts[order.pop()]
            rows.append(stream[s : s + args.seq_len + 1])
        return torch.stack(rows)

    def step_fn(step: int, total: int, warmup: int) -> float:
        lr = lr_at(step, total, warmup, args.lr, args.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = next_batch()
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast():
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach().item()

    # ---- train
    model.train()
    t_train = time.time()
    deadline = t_train + args.minutes * 60
    total_steps = args.max_steps
    probe_steps = 0
    losses: list[float] = []
    if total_steps is None:
        # Estimate the step count that fits in --minutes from the first steps (at a
        # warmup-sized learning rate, so they count as warmup).
        probe_steps = 10
        for s in range(probe_steps):
            losses.append(step_fn(s, 10**9, 10**9 // 30))
        per_step = (time.time() - t_train) / probe_steps
        total_steps = max(probe_steps + 1, int(args.minutes * 60 / per_step * 0.97))
        log(f"{per_step:.2f} s/step -> {total_steps} steps in {args.minutes} minutes")
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, int(0.03 * total_steps))
    tokens_per_step = args.batch_size * args.seq_len
    step = probe_steps
    t_log = time.time()
    stop_at = total_steps if args.stop_after_steps is None else min(total_steps, args.stop_after_steps)
    stopped_by_time = False
    while step < stop_at:
        if time.time() > deadline:
            stopped_by_time = True
            log(f"time cap of {args.minutes} minutes reached at step {step}/{total_steps}")
            break
        losses.append(step_fn(step, total_steps, warmup))
        step += 1
        if step % args.log_every == 0 or step == total_steps:
            now = time.time()
            tps = tokens_per_step * args.log_every / max(1e-9, now - t_log)
            t_log = now
            recent = losses[-args.log_every :]
            log(
                f"step {step}/{total_steps} loss {sum(recent) / len(recent):.4f} "
                f"lr {lr_at(step - 1, total_steps, warmup, args.lr, args.min_lr_ratio):.2e} {tps:.0f} tok/s"
            )
        if args.eval_every and step % args.eval_every == 0 and step < total_steps:
            ev, _ = evaluate(model, heldout_ids, args.seq_len, autocast, max_tokens=32 * args.seq_len)
            log(f"step {step} held-out loss (subset) {ev:.4f}")
    train_time = time.time() - t_train
    steps_done = step
    tokens_trained = steps_done * tokens_per_step
    log(f"trained {steps_done} steps, {tokens_trained:,} tokens in {train_time / 60:.1f} min "
        f"({tokens_trained / train_time:.0f} tok/s)")

    # ---- evaluate: model in the dtype it is saved in, scored in float32
    save_dtype = getattr(torch, args.save_dtype)
    model = model.to(save_dtype).float()
    heldout_loss, targets = evaluate(model, heldout_ids, args.seq_len, contextlib.nullcontext, max_tokens=args.eval_tokens)
    uni = unigram_loss(train_ids, targets, vocab)
    log(f"held-out loss {heldout_loss:.4f} nats/token over {targets.numel():,} tokens; unigram {uni:.4f}")

    # ---- save
    model = model.to(save_dtype)
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_tokenizer_config(out_dir, tokenizer, args.seq_len)
    gen_cfg = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.convert_tokens_to_ids(EOT),
        bos_token_id=tokenizer.convert_tokens_to_ids(EOT),
        do_sample=True,
        **GENERATION_DEFAULTS,
    )
    gen_cfg.save_pretrained(out_dir)

    # ---- samples (greedy, float32, from the saved weights' precision)
    samples = greedy_samples(model.float(), tokenizer, DEFAULT_SAMPLE_PROMPTS, args.sample_tokens)
    penalized = greedy_samples(model, tokenizer, DEFAULT_SAMPLE_PROMPTS, args.sample_tokens,
                               repetition_penalty=GENERATION_DEFAULTS["repetition_penalty"])
    sampled = greedy_samples(model, tokenizer, DEFAULT_SAMPLE_PROMPTS, args.sample_tokens, sample_seed=args.seed)
    for s in samples + penalized + sampled:
        log(f"sample {s['prompt']!r} -> {s['completion']!r}")

    weights_bytes = (out_dir / "model.safetensors").stat().st_size
    tail = losses[-max(1, min(50, len(losses))) :]
    command = "python scripts/train_default_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
    reproduce = command
    if args.max_steps is None:
        reproduce += f" --max-steps {total_steps}"
    if stopped_by_time:
        reproduce += f" --stop-after-steps {steps_done}"
    report = {
        "command": command,
        "reproduce_command": reproduce,
        "seed": args.seed,
        "threads": args.threads,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "data": data_stats,
        "vocab_size": vocab,
        "train_tokens": int(len(train_ids)),
        "heldout_tokens": int(len(heldout_ids)),
        "heldout_tokens_scored": int(targets.numel()),
        "model": {
            "num_layers": args.num_layers,
            "hidden_size": args.hidden_size,
            "intermediate_size": args.intermediate_size,
            "num_heads": args.num_heads,
            "num_kv_heads": args.num_kv_heads,
            "seq_len": args.seq_len,
        },
        "params": n_params,
        "save_dtype": args.save_dtype,
        "weights_bytes": weights_bytes,
        "amp": args.amp,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "min_lr_ratio": args.min_lr_ratio,
        "warmup_steps": warmup,
        "weight_decay": args.weight_decay,
        "steps": steps_done,
        "planned_steps": total_steps,
        "tokens_trained": tokens_trained,
        "train_time_s": round(train_time, 1),
        "tokens_per_s": tokens_trained / max(1e-9, train_time),
        "final_train_loss": sum(tail) / len(tail),
        "heldout_loss": heldout_loss,
        "unigram_loss": uni,
        "sample_tokens": args.sample_tokens,
        "samples": samples,
        "samples_penalized": penalized,
        "samples_sampled": sampled,
        "generation_defaults": GENERATION_DEFAULTS,
        "repeated_4gram_fraction": repeated_ngram_fraction(model, tokenizer, args.sample_tokens),
    }
    if args.previous_report:
        prev = json.loads(Path(args.previous_report).read_text())
        report["previous"] = {k: prev.get(k) for k in ("command", "heldout_loss", "unigram_loss", "steps",
                                                      "tokens_trained", "train_time_s", "threads")}
    report["total_time_s"] = round(time.time() - t_start, 1)
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(out_dir, report)
    for f in out_dir.iterdir():
        if f.is_file():
            f.chmod(0o644)
    log(f"wrote {out_dir} ({sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file()) / 1e6:.1f} MB)")
    return report


if __name__ == "__main__":
    main()
