"""llama.cpp's side of scripts/compare_llamacpp.sh, and the JSON lines both sides print.

Standard library only (run it with any python3). Subcommands:

  w1        drive a running `llama-server --parallel 32` with W1 (../shared/bench/workloads.py) as
            token-id prompts on /completion, all requests at once (2 warm-up requests first, as
            `freight bench throughput` does), and print one JSON line (same keys as freight's).
  decode    run llama-bench on one GGUF: tg at depth (decode tokens/s after a prompt of --input-len
            tokens) and pg input,output (prompt + generation, total tokens/s), print one JSON line.
  freight   read `freight bench throughput|latency` output on stdin, print its JSON line reduced
            to the keys the comparison uses, tagged with engine/bench/round/dtype.
  summary   read the JSON lines of a run (a file) and print one ratio line per bench and dtype:
            freight / llama.cpp, the median over rounds (>1: freight faster).
"""
import argparse
import concurrent.futures as cf
import http.client
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _post(host, port, path, body, timeout):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:500]!r}")
        return json.loads(data)
    finally:
        conn.close()


def _completion(host, port, req, timeout):
    body = {"prompt": req["prompt_ids"], "n_predict": req["output_len"], "ignore_eos": True,
            "temperature": 0.0, "cache_prompt": False, "stream": False, "return_tokens": False}
    t = time.perf_counter()
    out = _post(host, port, "/completion", body, timeout)
    return out, time.perf_counter() - t


def cmd_w1(a):
    sys.path.insert(0, str(Path(a.shared) / "bench"))
    import workloads

    reqs = workloads.build("w1", a.seed)
    if a.limit:
        reqs = reqs[:a.limit]
    host, port = a.host, a.port
    with cf.ThreadPoolExecutor(max_workers=max(len(reqs), 2)) as pool:
        if a.warmup:
            list(pool.map(lambda r: _completion(host, port, r, a.timeout), reqs[:2]))
        t0 = time.perf_counter()
        results = list(pool.map(lambda r: _completion(host, port, r, a.timeout), reqs))
        elapsed = time.perf_counter() - t0
    prompt_tokens = sum(len(r["prompt_ids"]) for r in reqs)
    output_tokens = sum(r["output_len"] for r in reqs)
    predicted = sum(int(o.get("tokens_predicted", 0)) for o, _ in results)
    evaluated = sum(int(o.get("tokens_evaluated", 0)) for o, _ in results)
    if predicted != output_tokens:
        print(f"warning: llama-server generated {predicted} tokens, W1 asks for {output_tokens}", file=sys.stderr)
    lat = sorted(s for _, s in results)
    print(json.dumps({
        "engine": "llamacpp", "bench": "w1", "round": a.round, "dtype": a.dtype, "gguf": a.gguf,
        "num_requests": len(reqs), "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "generated_tokens": predicted, "evaluated_prompt_tokens": evaluated,
        "elapsed_s": round(elapsed, 3), "requests_per_s": round(len(reqs) / elapsed, 3),
        "total_tokens_per_s": round((prompt_tokens + output_tokens) / elapsed, 1),
        "output_tokens_per_s": round(output_tokens / elapsed, 1),
        "median_request_s": round(statistics.median(lat), 3), "startup_s": a.startup_s,
    }), flush=True)


def _llama_bench(binary, args):
    proc = subprocess.run([binary, *args, "-o", "jsonl"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"llama-bench failed ({proc.returncode}): {' '.join([binary, *args])}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def cmd_decode(a):
    common = ["-m", a.model, "-t", str(a.threads), "-r", str(a.repetitions), "-fa", a.flash_attn, *a.extra]
    tg = _llama_bench(a.llama_bench, [*common, "-p", "0", "-n", str(a.output_len), "-d", str(a.input_len)])
    pg = _llama_bench(a.llama_bench, [*common, "-p", "0", "-n", "0", "-pg", f"{a.input_len},{a.output_len}"])
    tg, pg = tg[0], pg[0]
    print(json.dumps({
        "engine": "llamacpp", "bench": "decode", "round": a.round, "dtype": a.dtype, "gguf": a.gguf,
        "batch_size": 1, "input_len": a.input_len, "output_len": a.output_len, "threads": a.threads,
        # tg N at depth D: N decode steps after a D-token context, tokens/s (compare freight's decode_tokens_per_s)
        "decode_tokens_per_s": round(tg["avg_ts"], 1), "decode_tokens_per_s_stddev": round(tg["stddev_ts"], 1),
        # pg D,N: prefill D tokens then N decode steps, (D+N)/time (compare freight's total_tokens_per_s)
        "total_tokens_per_s": round(pg["avg_ts"], 1),
        "mean_decode_step_ms": round(tg["avg_ns"] / 1e6 / a.output_len, 3),
        "flash_attn": tg.get("flash_attn"), "type_k": tg.get("type_k"), "repetitions": a.repetitions,
    }), flush=True)


def cmd_freight(a):
    line = next((ln for ln in sys.stdin if ln.startswith("{")), None)
    if line is None:
        raise SystemExit(f"freight printed no JSON line ({a.bench}, {a.dtype})")
    r = json.loads(line)
    out = {"engine": "freight", "bench": a.bench, "round": a.round, "dtype": a.dtype}
    keys = (["num_requests", "prompt_tokens", "output_tokens", "generated_tokens", "elapsed_s", "requests_per_s",
             "total_tokens_per_s", "output_tokens_per_s", "preemptions", "steps", "startup_s"]
            if a.bench == "w1" else
            ["batch_size", "input_len", "output_len", "num_iters", "decode_tokens_per_s", "total_tokens_per_s",
             "output_tokens_per_s", "mean_decode_step_ms", "p50_decode_step_ms", "prefill_s", "startup_s"])
    out.update({k: r[k] for k in keys if k in r})
    out["freight_dtype"] = r.get("dtype")
    print(json.dumps(out), flush=True)


def cmd_summary(a):
    rows = [json.loads(ln) for ln in open(a.file) if ln.startswith("{")]
    metrics = {"w1": ["total_tokens_per_s", "output_tokens_per_s"],
               "decode": ["decode_tokens_per_s", "total_tokens_per_s"]}
    seen = []
    for r in rows:
        key = (r.get("bench"), r.get("dtype"))
        if r.get("engine") in ("freight", "llamacpp") and key not in seen:
            seen.append(key)
    for bench, dtype in seen:
        out = {"bench": bench, "dtype": dtype, "ratio": "freight/llamacpp"}
        for m in metrics.get(bench, []):
            per = {e: {r["round"]: r[m] for r in rows
                       if r.get("engine") == e and r.get("bench") == bench and r.get("dtype") == dtype and m in r}
                   for e in ("freight", "llamacpp")}
            rounds = sorted(set(per["freight"]) & set(per["llamacpp"]))
            ratios = [per["freight"][i] / per["llamacpp"][i] for i in rounds if per["llamacpp"][i]]
            out[f"freight_{m}_median"] = statistics.median(per["freight"].values()) if per["freight"] else None
            out[f"llamacpp_{m}_median"] = statistics.median(per["llamacpp"].values()) if per["llamacpp"] else None
            out[f"{m}_ratios"] = [round(x, 3) for x in ratios]
            out[f"{m}_ratio_median"] = round(statistics.median(ratios), 3) if ratios else None
        print(json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("w1")
    w.add_argument("--host", default="127.0.0.1")
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--limit", type=int, default=0, help="first N W1 requests only (smoke tests)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--no-warmup", dest="warmup", action="store_false")
    w.add_argument("--timeout", type=float, default=1800)
    w.add_argument("--shared", default=str(SHARED))
    d = sub.add_parser("decode")
    d.add_argument("--llama-bench", required=True)
    d.add_argument("--model", required=True)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--input-len", type=int, default=128)
    d.add_argument("--output-len", type=int, default=64)
    d.add_argument("--repetitions", type=int, default=3)
    d.add_argument("--flash-attn", default="auto")
    d.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more llama-bench arguments")
    f = sub.add_parser("freight")
    f.add_argument("--bench", choices=["w1", "decode"], required=True)
    s = sub.add_parser("summary")
    s.add_argument("file")
    for p in (w, d, f):
        p.add_argument("--round", type=int, default=1)
        p.add_argument("--dtype", default="")
    for p in (w, d):
        p.add_argument("--gguf", default="")
    w.add_argument("--startup-s", type=float, default=None)
    a = ap.parse_args()
    {"w1": cmd_w1, "decode": cmd_decode, "freight": cmd_freight, "summary": cmd_summary}[a.cmd](a)


if __name__ == "__main__":
    main()
