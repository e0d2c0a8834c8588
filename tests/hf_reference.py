"""Reference outputs from Hugging Face transformers, and comparison helpers.

`hf_greedy(model_dir, prompt_ids, n)` runs transformers' own forward pass with a
KV cache, greedy, for exactly n new tokens with EOS disabled (the engine side uses
`ignore_eos=True`). It returns the new tokens, the raw float32 logits of every
step, and per-step log_softmax of the chosen token and the top-2 gap.

`assert_same_tokens(...)` compares an engine's output with the reference and, at
the first divergent step, reports the reference's top-2 logit gap there, so a
near-tie (gap < NEAR_TIE) shows up as such instead of as an unexplained mismatch.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

NEAR_TIE = 1e-3


@functools.lru_cache(maxsize=16)
def load_hf(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model


@dataclass
class Reference:
    prompt_ids: list[int]
    tokens: list[int]  # the n generated tokens
    logits: torch.Tensor  # [n, vocab] raw float32 logits of each step
    logprobs: list[float]  # log_softmax(logits[i])[tokens[i]]
    gaps: list[float]  # top1 - top2 logit at each step

    @property
    def min_gap(self) -> float:
        return min(self.gaps) if self.gaps else float("inf")


def hf_greedy(model_dir, prompt_ids: Sequence[int], n: int) -> Reference:
    """Greedy-decode n tokens with transformers (cached forward, EOS never stops it)."""
    return greedy_with_model(load_hf(str(model_dir)), prompt_ids, n)


@torch.no_grad()
def greedy_with_model(model, prompt_ids: Sequence[int], n: int) -> Reference:
    """hf_greedy for an already loaded (possibly modified) transformers model."""
    from transformers import DynamicCache

    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    cache = DynamicCache(config=model.config)  # updated in place by every forward
    # transformers >= 5.2x names the argument `cache`; older releases `past_key_values`.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    tokens, rows = [], []
    for step in range(n):
        logits = out.logits[0, -1].float()
        rows.append(logits.clone())
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        if step + 1 == n:
            break
        out = model(input_ids=torch.tensor([[tok]]), use_cache=True, **{cache_kw: cache})
    logits = torch.stack(rows) if rows else torch.empty(0)
    logp = torch.log_softmax(logits.double(), dim=-1)
    top2 = torch.topk(logits, 2, dim=-1).values
    return Reference(
        prompt_ids=list(prompt_ids),
        tokens=tokens,
        logits=logits,
        logprobs=[float(logp[i, t]) for i, t in enumerate(tokens)],
        gaps=[float(top2[i, 0] - top2[i, 1]) for i in range(len(tokens))],
    )


@torch.no_grad()
def hf_generate(model_dir, prompt_ids: Sequence[int], n: int) -> list[int]:
    """transformers' model.generate(), greedy, exactly n new tokens (EOS disabled).

    Used to cross-check `hf_greedy` itself; the tests compare against hf_greedy.
    """
    model = load_hf(str(model_dir))
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
        min_new_tokens=n, eos_token_id=None, pad_token_id=0,
    )
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def hf_logits_for(model_dir, prompt_ids: Sequence[int], gen_ids: Sequence[int]) -> torch.Tensor:
    """Raw logits predicting each of gen_ids given prompt + preceding gen_ids: [len(gen_ids), vocab]."""
    model = load_hf(str(model_dir))
    full = list(prompt_ids) + list(gen_ids)
    out = model(input_ids=torch.tensor([full]))
    p = len(prompt_ids)
    return out.logits[0, p - 1: p - 1 + len(gen_ids)].float()


def first_divergence(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    if len(a) != len(b):
        return min(len(a), len(b))
    return None


def describe_divergence(ref: Reference, got: Sequence[int], label: str = "") -> Optional[str]:
    """None when equal, else a one-paragraph diagnosis."""
    i = first_divergence(ref.tokens, got)
    if i is None:
        return None
    if i >= len(ref.tokens) or i >= len(got):
        return (f"{label}: length differs: engine produced {len(got)} tokens, reference {len(ref.tokens)} "
                f"(prompt len {len(ref.prompt_ids)})")
    logits = ref.logits[i]
    top = torch.topk(logits, 3)
    gap = ref.gaps[i]
    got_logit = float(logits[got[i]])
    kind = "NEAR-TIE (numerical noise, not necessarily a bug)" if gap < NEAR_TIE else "REAL divergence"
    return (
        f"{label}: {kind} at generated step {i} (absolute position {len(ref.prompt_ids) + i}, "
        f"prompt len {len(ref.prompt_ids)}): reference token {ref.tokens[i]}, engine token {got[i]}; "
        f"reference top-2 gap {gap:.3g}; reference logit of engine's token {got_logit:.5f} vs top "
        f"{float(top.values[0]):.5f}; top-3 ids {top.indices.tolist()}; "
        f"ref[{max(0, i - 3)}:{i + 3}]={ref.tokens[max(0, i - 3):i + 3]} "
        f"engine[{max(0, i - 3)}:{i + 3}]={list(got[max(0, i - 3):i + 3])}"
    )


def assert_same_tokens(ref: Reference, got: Sequence[int], label: str = "") -> None:
    msg = describe_divergence(ref, got, label)
    assert msg is None, msg


def degeneracy(tokens: Sequence[int]) -> tuple[int, int]:
    """(number of distinct tokens, longest run of one repeated token)."""
    longest = run = 0
    prev = None
    for t in tokens:
        run = run + 1 if t == prev else 1
        prev = t
        longest = max(longest, run)
    return len(set(tokens)), longest


# -- shared by the per-architecture parity tests ------------------------------------------
_GREEDY_CACHE: dict = {}


def cached_greedy(model_dir, prompt_ids: Sequence[int], n: int) -> Reference:
    """hf_greedy, computed once per (model, prompt, n) in a test session."""
    key = (str(model_dir), tuple(prompt_ids), n)
    if key not in _GREEDY_CACHE:
        _GREEDY_CACHE[key] = hf_greedy(model_dir, list(prompt_ids), n)
    return _GREEDY_CACHE[key]


def greedy_params(n: int):
    from freight import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def run_greedy(llm, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    """freight's greedy tokens for each prompt (token ids), in order."""
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], greedy_params(n), use_tqdm=False)
    assert [list(o.prompt_token_ids) for o in outs] == [list(p) for p in prompts]
    return [list(o.outputs[0].token_ids) for o in outs]


def assert_matches_hf(model_dir, prompts, got, n: int, label: str) -> None:
    """Every output equals transformers' greedy; the message names near-ties as such."""
    problems = [describe_divergence(cached_greedy(model_dir, p, n), g, f"{label} prompt#{i} (len {len(p)})")
                for i, (p, g) in enumerate(zip(prompts, got))]
    problems = [m for m in problems if m]
    assert not problems, f"{len(problems)}/{len(prompts)} outputs differ from HF:\n" + "\n".join(problems)


def check_preemption(make_llm, model_dir, prompts, n: int, label: str) -> None:
    """A KV cache of 6 blocks forces preemption (asserted); every output still equals transformers'."""
    from model_factory import kv_bytes_per_block

    llm = make_llm(model_dir, kv_cache_memory=6 * kv_bytes_per_block(model_dir, 16), max_model_len=64,
                   max_num_batched_tokens=32)
    got = run_greedy(llm, prompts, n)
    s = llm.llm_engine.get_stats()
    assert s.num_preemptions > 0, f"expected preemptions with {s.num_total_blocks} blocks, got none"
    assert_matches_hf(model_dir, prompts, got, n, label)


def check_prefix_cache_hit(make_llm, model_dir, prompts, n: int) -> None:
    """prompts[1] shares a prefix of at least 32 tokens with prompts[0]: it must hit the prefix cache and
    both outputs still equal transformers'."""
    llm = make_llm(model_dir, enable_prefix_caching=True)
    first = run_greedy(llm, prompts[:1], n)
    outs = llm.generate([{"prompt_token_ids": prompts[1]}], greedy_params(n), use_tqdm=False)
    assert outs[0].num_cached_tokens >= 32, outs[0].num_cached_tokens
    assert_matches_hf(model_dir, prompts, first + [list(outs[0].outputs[0].token_ids)], n, "prefix cache")
