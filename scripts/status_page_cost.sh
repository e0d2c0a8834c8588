#!/usr/bin/env bash
# Engine step time with the status page open vs without: one server, `freight bench serve` rounds
# alternating without and with an SSE client on /status/events. Step time = wall time / engine steps
# (the engine is busy throughout a round).
#   MODEL=/tmp/bench-135m ROUNDS=3 scripts/status_page_cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:=/tmp/bench-135m}" "${ROUNDS:=3}" "${PORT:=18901}" "${DTYPE:=bfloat16}"
OUT=$(mktemp -d)
.venv/bin/python -m freight serve "$MODEL" --dtype "$DTYPE" --port "$PORT" --disable-log-requests \
    --disable-uvicorn-access-log > "$OUT/server.log" 2>&1 &
SRV=$!
trap 'kill $SRV 2>/dev/null; wait $SRV 2>/dev/null; rm -rf "$OUT"' EXIT
for _ in $(seq 180); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
steps() { curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^freight:engine_steps_total/ {s += $2} END {print s}'; }
round() {  # round MODE N
  local mode=$1 r=$2 watcher=""
  if [ "$mode" = page ]; then
    curl -sN "http://127.0.0.1:$PORT/status/events" > "$OUT/events" & watcher=$!
    sleep 1
  fi
  local s0 t0 s1 t1 events=0
  s0=$(steps); t0=$(date +%s.%N)
  .venv/bin/python -m freight bench serve --base-url "http://127.0.0.1:$PORT" --model "$MODEL" --num-prompts 64 \
      --random-input-len 256 --random-output-len 128 --ignore-eos --disable-tqdm --output-json "$OUT/r.json" \
      > /dev/null 2>&1
  t1=$(date +%s.%N); s1=$(steps)
  if [ -n "$watcher" ]; then kill "$watcher"; wait "$watcher" 2>/dev/null || true; events=$(grep -c '^data:' "$OUT/events"); fi
  .venv/bin/python - "$mode" "$r" "$s0" "$s1" "$t0" "$t1" "$events" "$OUT/r.json" <<'PY'
import json, sys
mode, r, s0, s1, t0, t1, events, path = sys.argv[1:]
d = json.load(open(path))
steps, elapsed = float(s1) - float(s0), float(t1) - float(t0)
print(json.dumps({"mode": mode, "round": int(r), "steps": steps, "elapsed_s": round(elapsed, 2),
                  "ms_per_step": round(1000 * elapsed / steps, 2), "output_throughput": d["output_throughput"],
                  "median_tpot_ms": d["median_tpot_ms"], "median_ttft_ms": d["median_ttft_ms"],
                  "events": int(events)}))
PY
}
round none 0 > /dev/null  # warm-up
for r in $(seq "$ROUNDS"); do round none "$r"; round page "$r"; done
