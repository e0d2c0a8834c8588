"""vLLM's offline throughput on the standard workloads (run in vLLM's own virtualenv).

    VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 LD_PRELOAD=$VENV/lib/libiomp5.so \\
        $VENV/bin/python scripts/peer_vllm_offline.py --model /tmp/bench-135m --workloads w1,w2

Prints one JSON line per run (same keys as `freight bench throughput`). The workloads
come from ../shared/bench/workloads.py, the same requests freight's --dataset-name uses.
"""
import argparse
import json
import sys
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--workloads", default="w1")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--no-enable-prefix-caching", dest="caching", action="store_false")
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    args = p.parse_args()
    sys.path.insert(0, str(Path(args.shared) / "bench"))
    import workloads
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=2048, seed=0,
              enable_prefix_caching=args.caching)
    startup = time.perf_counter() - t0
    for name in args.workloads.split(","):
        reqs = workloads.build(name)
        prompts = [{"prompt_token_ids": r["prompt_ids"]} for r in reqs]
        params = [SamplingParams(temperature=0, max_tokens=r["output_len"], ignore_eos=True) for r in reqs]
        llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up, as freight's bench does
        llm.reset_prefix_cache()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        pt = sum(len(r["prompt_ids"]) for r in reqs)
        ot = sum(len(o.outputs[0].token_ids) for o in outs)
        print(json.dumps({"engine": "vllm", "dataset": name, "prefix_caching": args.caching,
                          "elapsed_s": round(elapsed, 3), "total_tokens_per_s": round((pt + ot) / elapsed, 1),
                          "output_tokens_per_s": round(ot / elapsed, 1), "startup_s": round(startup, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
