#!/usr/bin/env bash
# freight serve vs vLLM serve, one after the other, each measured by `freight bench serve`:
# 64 requests of 256 random prompt tokens / 128 output tokens at several Poisson rates.
#   VLLM_VENV=/path/to/vllm-venv MODEL=/tmp/bench-135m scripts/compare_serve.sh > serve.jsonl
# DTYPE=float32 on a CPU without AVX512_BF16 (both engines run it natively there).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${VLLM_VENV:?set VLLM_VENV to the vLLM virtualenv}" "${MODEL:=/tmp/bench-135m}" "${PORT:=8765}"
: "${RATES:=1 2 4 inf}" "${ENGINES:=freight vllm}" "${DTYPE:=bfloat16}"
export HF_HUB_OFFLINE=1

wait_ready() {  # prints the seconds from launch to a healthy server
  local start=$1
  until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do sleep 0.2; done
  python3 -c "import time; print(round(time.time() - $start, 1))"
}

for engine in $ENGINES; do
  start=$(python3 -c "import time; print(time.time())")
  if [ "$engine" = freight ]; then
    .venv/bin/freight serve "$MODEL" --host 127.0.0.1 --port "$PORT" --dtype "$DTYPE" > /tmp/serve-$engine.log 2>&1 &
  else
    VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 LD_PRELOAD="$VLLM_VENV/lib/libiomp5.so" \
      "$VLLM_VENV/bin/python" scripts/peer_vllm_cli.py serve "$MODEL" --host 127.0.0.1 --port "$PORT" \
      --dtype "$DTYPE" --max-model-len 2048 > /tmp/serve-$engine.log 2>&1 &
  fi
  pid=$!
  ready=$(wait_ready "$start")
  echo "{\"engine\": \"$engine\", \"startup_to_ready_s\": $ready}"
  for rate in $RATES; do
    .venv/bin/python -m freight bench serve --base-url "http://127.0.0.1:$PORT" --tokenizer "$MODEL" \
      --dataset-name random --input-len 256 --output-len 128 --random-range-ratio 0 --num-prompts 64 \
      --request-rate "$rate" --disable-tqdm --output-json /tmp/serve-$engine-$rate.json > /dev/null 2>&1 || true
    python3 -c "import json,sys; r=json.load(open('/tmp/serve-$engine-$rate.json')); r['engine']='$engine'; print(json.dumps({k: r[k] for k in ('engine','request_rate','completed','failed','duration','output_throughput','median_ttft_ms','p99_ttft_ms','median_tpot_ms','p99_tpot_ms','median_itl_ms','p99_itl_ms') if k in r}))"
  done
  kill -INT "$pid"; wait "$pid" || true
done
