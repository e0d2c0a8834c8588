"""How much int8 weight quantization changes a model's output: greedy agreement and logprob drift.

For each model, 16 prompts (default) are decoded greedily for 64 tokens, unquantized and with
quantization="int8", in one batch each. Reported:
- prompts whose int8 continuation is identical; the mean share of tokens generated before the
  first divergence (a divergence after a near-tie is still counted);
- mean and max |logprob int8 - logprob float| of the unquantized model's own greedy tokens, with
  both models fed the same text (teacher forcing via prompt_logprobs), so that a divergence early
  in one sequence does not turn every later token into a comparison of different texts.

    .venv/bin/python scripts/quant_accuracy.py                       # stories260k + a tests/model_factory model
    .venv/bin/python scripts/quant_accuracy.py --model DIR --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260k"
PROMPTS = ["Once upon a time", "The little dog", "Lily and her mom went to the park", "One day",
           "Tom had a big red ball", "The sun was warm and", "There was a little bird", "Max and Sue were friends",
           "The cat wanted to", "In the forest there was", "Sam liked to play with", "Mom said",
           "The boat went on the river", "A king lived in a castle", "She found a cake", "They all smiled because"]


def _engine(model: Path, dtype: str, quantization):
    from freight import LLM

    return LLM(model=str(model), dtype=dtype, device="cpu", kv_cache_memory="256MiB", seed=0,
               quantization=quantization)


def _greedy(llm, prompts: list[list[int]], n: int) -> list[list[int]]:
    from freight import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _token_logprobs(llm, sequences: list[list[int]], start: list[int]) -> list[list[float]]:
    """logprob of each token of sequences[i] from position start[i] on, given the tokens before it."""
    from freight import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
    return [[o.prompt_logprobs[j][s[j]] for j in range(b, len(s))] for o, s, b in zip(outs, sequences, start)]


def measure(model: Path, dtype: str, num_prompts: int, n: int) -> dict:
    base = _engine(model, dtype, None)
    tok = base.get_tokenizer()
    prompts = [tok.encode(t) for t in (PROMPTS * (1 + num_prompts // len(PROMPTS)))[:num_prompts]]
    ref = _greedy(base, prompts, n)
    seqs = [p + r for p, r in zip(prompts, ref)]
    starts = [len(p) for p in prompts]
    ref_lp = _token_logprobs(base, seqs, starts)
    base.llm_engine.shutdown()
    quant = _engine(model, dtype, "int8")
    got = _greedy(quant, prompts, n)
    got_lp = _token_logprobs(quant, seqs, starts)
    quant.llm_engine.shutdown()
    agree = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), n) / n for r, g in zip(ref, got)]
    diffs = [abs(a - b) for ra, ga in zip(ref_lp, got_lp) for a, b in zip(ra, ga)]
    return dict(model=model.name, dtype=dtype, prompts=num_prompts, tokens=n,
                identical=sum(r == g for r, g in zip(ref, got)), agreement=sum(agree) / len(agree),
                mean_abs_logprob_diff=sum(diffs) / len(diffs), max_abs_logprob_diff=max(diffs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="model directory (repeatable; default: stories260k "
                                                     "and tests/model_factory's --factory-variant)")
    ap.add_argument("--factory-variant", default="llama_gqa", help="tests/model_factory.py variant to build")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = [Path(m) for m in args.model or []]
        if not models:
            sys.path.insert(0, str(REPO / "tests"))
            from model_factory import make_variant

            models = [STORIES, make_variant(Path(tmp), args.factory_variant)]
        print("model            dtype     identical  agreement  mean|dlogp|  max|dlogp|")
        for m in models:
            r = measure(m, args.dtype, args.num_prompts, args.max_tokens)
            print(f"{r['model']:16s} {r['dtype']:9s} {r['identical']:3d}/{r['prompts']:<5d} {r['agreement']:9.1%}  "
                  f"{r['mean_abs_logprob_diff']:11.4f}  {r['max_abs_logprob_diff']:10.4f}", flush=True)


if __name__ == "__main__":
    main()
