#!/usr/bin/env bash
# freight vs the real vLLM (CPU build) on W1/W2, alternating runs in one session.
#   VLLM_VENV=/path/to/vllm-venv MODEL=/tmp/bench-135m scripts/compare_vllm.sh > results.jsonl
# See ../shared/peers/README.md for installing vLLM; build MODEL with ../shared/bench/make_bench_model.py.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${VLLM_VENV:?set VLLM_VENV to the vLLM virtualenv}" "${MODEL:=/tmp/bench-135m}" "${ROUNDS:=3}"
: "${DTYPE:=bfloat16}"  # float32 on a CPU without AVX512_BF16 (both engines run it natively there)
FREIGHT=(.venv/bin/python -m freight bench throughput --model "$MODEL" --dtype "$DTYPE")
vllm() {
  VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 LD_PRELOAD="$VLLM_VENV/lib/libiomp5.so" \
    HF_HUB_OFFLINE=1 "$VLLM_VENV/bin/python" scripts/peer_vllm_offline.py --model "$MODEL" --dtype "$DTYPE" "$@" 2>/dev/null \
    | grep '^{'
}
freight() { HF_HUB_OFFLINE=1 "${FREIGHT[@]}" "$@" 2>/dev/null | grep '^{'; }
settle() { sleep 10; }  # let the previous engine's processes exit before measuring the next
for i in $(seq "$ROUNDS"); do
  freight --dataset-name w1; settle
  if [ "$i" = 1 ]; then vllm --workloads w1,w2; else vllm --workloads w1; fi; settle
done
[ "${SKIP_W2:-0}" = 1 ] && exit 0
freight --dataset-name w2
freight --dataset-name w2 --no-enable-prefix-caching
vllm --workloads w2 --no-enable-prefix-caching
