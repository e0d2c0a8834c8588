#!/usr/bin/env bash
# freight vs llama.cpp on the same model, alternating in one session (only ratios taken in one run mean much).
#   scripts/install_llamacpp.sh                                   # once: build llama.cpp, convert the GGUFs
#   MODEL=/tmp/bench-135m scripts/compare_llamacpp.sh > llamacpp.jsonl
# Two benches, each a JSON line per engine per round, then one ratio line (freight / llama.cpp) per bench+dtype:
#   w1      W1 (../shared/bench/workloads.py: 32 requests, prompts 32-512, outputs 16-256, greedy, ignore_eos,
#           all at once): `freight bench throughput --dataset-name w1` vs `llama-server --parallel 32`
#           (continuous batching) sent the same token-id prompts on /completion, all at once
#           (scripts/peer_llamacpp_bench.py w1). Total and output tokens/s over the wall time.
#   decode  single stream: `freight bench latency --batch-size 1 --input-len 128 --output-len 64` vs llama-bench
#           `-p 0 -n 64 -d 128` (64 decode steps after a 128-token context: decode tokens/s) and `-pg 128,64`
#           (prefill + decode: total tokens/s).
# dtypes: float32 (GGUF f32), bfloat16 (bf16), int8 (freight --quantization int8 on INT8_BASE_DTYPE weights:
# attention/MLP weights int8, head and embeddings float; llama.cpp q8_0: every matrix incl. the tied embedding).
# Env (defaults): LLAMACPP_DIR (/tmp/llamacpp), MODEL (/tmp/bench-135m), ROUNDS (2), BENCHES ("w1 decode"),
#   W1_DTYPES (bfloat16), DTYPES ("float32 bfloat16 int8", the decode bench), INT8_BASE_DTYPE (bfloat16),
#   THREADS (2), FLASH_ATTN (auto), PARALLEL (32), CTX (32768: 32 slots x 1024 tokens), PORT (8766),
#   DECODE_ITERS (3: freight --num-iters / llama-bench -r), INPUT_LEN (128), OUTPUT_LEN (64), SETTLE_S (10),
#   W1_LIMIT (0 = all 32; N = first N W1 requests, smoke tests only), LLAMA_SERVER_ARGS / LLAMA_BENCH_ARGS
#   (extra llama-server / llama-bench flags, e.g. "-ctk bf16 -ctv bf16": llama.cpp's KV cache is f16 by default),
#   LOG_DIR (a new temp dir; engine logs). Odd rounds run freight first, even rounds llama.cpp first.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LLAMACPP_DIR:=/tmp/llamacpp}" "${MODEL:=/tmp/bench-135m}" "${ROUNDS:=2}" "${BENCHES:=w1 decode}"
: "${W1_DTYPES:=bfloat16}" "${DTYPES:=float32 bfloat16 int8}" "${INT8_BASE_DTYPE:=bfloat16}"
: "${THREADS:=2}" "${FLASH_ATTN:=auto}" "${PARALLEL:=32}" "${CTX:=32768}" "${PORT:=8766}"
: "${DECODE_ITERS:=3}" "${INPUT_LEN:=128}" "${OUTPUT_LEN:=64}" "${SETTLE_S:=10}" "${W1_LIMIT:=0}"
: "${LLAMA_SERVER_ARGS:=}" "${LLAMA_BENCH_ARGS:=}" "${LOG_DIR:=$(mktemp -d /tmp/compare-llamacpp.XXXX)}"
export HF_HUB_OFFLINE=1
BIN=$LLAMACPP_DIR/build/bin
HELPER=(python3 scripts/peer_llamacpp_bench.py)
RESULTS=$LOG_DIR/results.jsonl
mkdir -p "$LOG_DIR"; : > "$RESULTS"
say() { echo "[compare_llamacpp] $*" >&2; }
die() { say "error: $*"; exit 1; }

gguf_type() {
  case $1 in float32) echo f32;; bfloat16) echo bf16;; int8) echo q8_0;; *) die "unknown dtype '$1' (float32, bfloat16, int8)";; esac
}
gguf_path() { echo "$LLAMACPP_DIR/$(basename "$MODEL")-$(gguf_type "$1").gguf"; }
freight_dtype_args() {
  case $1 in int8) echo "--dtype $INT8_BASE_DTYPE --quantization int8";; *) echo "--dtype $1";; esac
}

# --- prerequisites: fail early, saying how to make what is missing
[ -x .venv/bin/python ] || die "no .venv here: install freight first"
[ -f "$MODEL/config.json" ] || die "no model at $MODEL: .venv/bin/python ../shared/bench/make_bench_model.py $MODEL"
missing=()
case " $BENCHES " in *" w1 "*) [ -x "$BIN/llama-server" ] || missing+=("$BIN/llama-server");; esac
case " $BENCHES " in *" decode "*) [ -x "$BIN/llama-bench" ] || missing+=("$BIN/llama-bench");; esac
needed=""
case " $BENCHES " in *" w1 "*) needed+=" $W1_DTYPES";; esac
case " $BENCHES " in *" decode "*) needed+=" $DTYPES";; esac
for dt in $(printf "%s\n" $needed | sort -u); do g=$(gguf_path "$dt"); [ -s "$g" ] || missing+=("$g"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "missing llama.cpp build or GGUF files:"; printf '  %s\n' "${missing[@]}" >&2
  die "make them with: LLAMACPP_DIR=$LLAMACPP_DIR MODEL=$MODEL scripts/install_llamacpp.sh"
fi
say "logs and results in $LOG_DIR"

server_pid=""
stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -TERM "$server_pid"; wait "$server_pid" || true; fi
  server_pid=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM  # so that the EXIT trap stops a running llama-server
settle() { sleep "$SETTLE_S"; }  # let the previous engine's processes exit before measuring the next

freight_w1() {  # round dtype
  local extra=(); [ "$W1_LIMIT" -gt 0 ] && extra=(--num-prompts "$W1_LIMIT")
  # shellcheck disable=SC2046
  .venv/bin/python -m freight bench throughput --model "$MODEL" $(freight_dtype_args "$2") --dataset-name w1 \
    "${extra[@]}" 2>> "$LOG_DIR/freight.log" \
    | "${HELPER[@]}" freight --bench w1 --round "$1" --dtype "$2" | tee -a "$RESULTS"
}

llamacpp_w1() {  # round dtype
  local log=$LOG_DIR/llama-server-$2-$1.log start t0
  ! curl -s -o /dev/null "http://127.0.0.1:$PORT/" || die "port $PORT is already in use (set PORT)"
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  "$BIN/llama-server" -m "$(gguf_path "$2")" --host 127.0.0.1 --port "$PORT" -t "$THREADS" -tb "$THREADS" \
    --parallel "$PARALLEL" -c "$CTX" -fa "$FLASH_ATTN" --cache-ram 0 --no-webui $LLAMA_SERVER_ARGS > "$log" 2>&1 &
  server_pid=$!
  until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do
    kill -0 "$server_pid" 2>/dev/null || { tail -20 "$log" >&2; die "llama-server exited (log: $log)"; }
    sleep 0.2
  done
  start=$(python3 -c "import time; print(round(time.time() - $t0, 2))")
  "${HELPER[@]}" w1 --port "$PORT" --limit "$W1_LIMIT" --round "$1" --dtype "$2" --gguf "$(gguf_type "$2")" \
    --startup-s "$start" | tee -a "$RESULTS"
  stop_server
}

freight_decode() {  # round dtype
  # shellcheck disable=SC2046
  .venv/bin/python -m freight bench latency --model "$MODEL" $(freight_dtype_args "$2") --batch-size 1 \
    --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --num-iters "$DECODE_ITERS" --num-iters-warmup 1 \
    2>> "$LOG_DIR/freight.log" \
    | "${HELPER[@]}" freight --bench decode --round "$1" --dtype "$2" | tee -a "$RESULTS"
}

llamacpp_decode() {  # round dtype
  # shellcheck disable=SC2086
  "${HELPER[@]}" decode --llama-bench "$BIN/llama-bench" --model "$(gguf_path "$2")" --threads "$THREADS" \
    --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --repetitions "$DECODE_ITERS" --flash-attn "$FLASH_ATTN" \
    --round "$1" --dtype "$2" --gguf "$(gguf_type "$2")" --extra $LLAMA_BENCH_ARGS 2>> "$LOG_DIR/llama-bench.log" \
    | tee -a "$RESULTS"
}

pair() {  # bench round dtype: both engines, freight first in odd rounds
  if [ $(($2 % 2)) = 1 ]; then "freight_$1" "$2" "$3"; settle; "llamacpp_$1" "$2" "$3"
  else "llamacpp_$1" "$2" "$3"; settle; "freight_$1" "$2" "$3"; fi
  settle
}

for i in $(seq "$ROUNDS"); do
  for bench in $BENCHES; do
    case $bench in
      w1) for dt in $W1_DTYPES; do pair w1 "$i" "$dt"; done;;
      decode) for dt in $DTYPES; do pair decode "$i" "$dt"; done;;
      *) die "unknown bench '$bench' (w1, decode)";;
    esac
  done
done
"${HELPER[@]}" summary "$RESULTS" | tee "$LOG_DIR/summary.jsonl"
