#!/usr/bin/env bash
# Build the llama.cpp peer (llama-server, llama-bench, llama-batched-bench) and convert bench-135m to GGUF
# (f32, bf16, q8_0), all under LLAMACPP_DIR, outside the project tree. Used by scripts/compare_llamacpp.sh.
#   scripts/install_llamacpp.sh                       # LLAMACPP_DIR=/tmp/llamacpp MODEL=/tmp/bench-135m
# Source: the llama.cpp tree vendored in the llama-cpp-python sdist (../shared/peers/README.md).
# Each step is skipped when its output exists; FORCE=1 redoes them. About 20-40 min on 2 busy cores
# (the C++ build); the build and conversions run at low CPU priority (autogroup nice 10).
#   LLAMA_CPP_PYTHON_VERSION  sdist version (default 0.3.36, the one this was written against; "" = newest)
#   JOBS                      build parallelism (default: nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
: "${LLAMACPP_DIR:=/tmp/llamacpp}" "${MODEL:=/tmp/bench-135m}" "${JOBS:=$(nproc)}" "${FORCE:=0}"
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION-0.3.36}
SRC=$LLAMACPP_DIR/llama.cpp BUILD=$LLAMACPP_DIR/build VENV=$LLAMACPP_DIR/venv
mkdir -p "$LLAMACPP_DIR"
lowprio() { bash -c 'echo 10 > /proc/self/autogroup 2>/dev/null || true; exec "$@"' _ "$@"; }
log() { echo "[install_llamacpp] $*" >&2; }

# 1. a venv for pip download and the converter (torch CPU wheel, transformers that reads bench-135m's
#    tokenizer_config, the converter's own gguf-py)
if [ ! -x "$VENV/bin/python" ] || [ "$FORCE" = 1 ]; then
  log "venv $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q "numpy<2.5" sentencepiece "transformers==5.24.0" "protobuf>=4.21" safetensors
fi

# 2. the source: llama-cpp-python's sdist, vendor/llama.cpp
if [ ! -f "$SRC/CMakeLists.txt" ] || [ "$FORCE" = 1 ]; then
  spec=llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}
  log "pip download $spec"
  rm -rf "$LLAMACPP_DIR/sdist" "$SRC"
  "$VENV/bin/pip" download -q --no-deps --no-binary :all: "$spec" -d "$LLAMACPP_DIR/sdist"
  tmp=$(mktemp -d "$LLAMACPP_DIR/unpack.XXXX")
  tar xzf "$LLAMACPP_DIR"/sdist/llama_cpp_python-*.tar.gz -C "$tmp"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$SRC"
  rm -rf "$tmp" "$SRC/.git"   # .git is a submodule pointer into the parent repo, absent here
fi
"$VENV/bin/python" -c "import gguf" 2>/dev/null || "$VENV/bin/pip" install -q "$SRC/gguf-py"

# 3. build: Release, native CPU flags, CPU backend only, no HTTPS/curl, no web UI download
if [ ! -x "$BUILD/bin/llama-server" ] || [ ! -x "$BUILD/bin/llama-bench" ] \
    || [ ! -x "$BUILD/bin/llama-batched-bench" ] || [ "$FORCE" = 1 ]; then
  log "cmake build in $BUILD (-j$JOBS)"
  start=$(date +%s)
  lowprio cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_CUDA=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF > "$LLAMACPP_DIR/cmake.log" 2>&1
  lowprio cmake --build "$BUILD" --config Release -j "$JOBS" \
    --target llama-server llama-bench llama-batched-bench > "$LLAMACPP_DIR/build.log" 2>&1 \
    || { tail -30 "$LLAMACPP_DIR/build.log" >&2; exit 1; }
  log "built in $(( $(date +%s) - start )) s"
fi

# 4. the model, then GGUF f32 / bf16 / q8_0 (the converter does not know bench-135m's tokenizer hash:
#    scripts/peer_llamacpp_convert.py maps it to llama.cpp's "gpt-2" pre-tokenizer, see there)
if [ ! -f "$MODEL/config.json" ]; then
  log "building $MODEL"
  "$ROOT/.venv/bin/python" "$ROOT/../shared/bench/make_bench_model.py" "$MODEL"
fi
name=$(basename "$MODEL")
for t in f32 bf16 q8_0; do
  out=$LLAMACPP_DIR/$name-$t.gguf
  if [ ! -s "$out" ] || [ "$FORCE" = 1 ]; then
    log "convert $MODEL -> $out"
    lowprio "$VENV/bin/python" "$ROOT/scripts/peer_llamacpp_convert.py" --llama-cpp "$SRC" "$MODEL" \
      --outtype "$t" --outfile "$out.tmp" > "$LLAMACPP_DIR/convert-$t.log" 2>&1 \
      || { tail -30 "$LLAMACPP_DIR/convert-$t.log" >&2; exit 1; }
    mv "$out.tmp" "$out"
  fi
done
log "done: $BUILD/bin/{llama-server,llama-bench,llama-batched-bench}, $LLAMACPP_DIR/$name-{f32,bf16,q8_0}.gguf"
