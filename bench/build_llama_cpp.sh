#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` and `llama-server` (the CPU peer of `pdserve bench-model --peers` and of the
# OpenAI-server comparison) from the vendored copy in the llama-cpp-python sdist on PyPI.
#
#   bash bench/build_llama_cpp.sh [OUT_DIR]      # default ~/.cache/pdserve/llama.cpp; prints the bin directory
#
# GGML_NATIVE=ON produced binaries that died with "Illegal instruction" on these VMs, so the ISA flags are set
# explicitly from /proc/cpuinfo (AVX2/FMA/F16C, AVX-512 F/BW/VL/VBMI/VNNI/BF16, AVX-VNNI where present).
# About 12 minutes on 2 cores the first time; a rebuild takes seconds. Nothing here is committed or installed.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
OUT="${1:-${PDSERVE_CACHE_DIR:-$HOME/.cache/pdserve}/llama.cpp}"
mkdir -p "$OUT"
SRC="$OUT/llama-cpp-python-$VERSION"
if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
  echo "[build_llama_cpp] fetching the llama-cpp-python $VERSION sdist from PyPI..." >&2
  python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$OUT"
  tar -xzf "$OUT/llama_cpp_python-$VERSION.tar.gz" -C "$OUT"
  [[ -d "$OUT/llama_cpp_python-$VERSION" ]] && mv "$OUT/llama_cpp_python-$VERSION" "$SRC"
fi
flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
ISA=(
  -DGGML_NATIVE=OFF -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)"
  -DGGML_F16C="$(has f16c)" -DGGML_AVX_VNNI="$(has avx_vnni)"
  -DGGML_AVX512="$( [[ $(has avx512f) == ON && $(has avx512bw) == ON && $(has avx512vl) == ON ]] && echo ON || echo OFF)"
  -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
  -DGGML_AVX512_BF16="$(has avx512_bf16)"
)
echo "[build_llama_cpp] ISA: ${ISA[*]}" >&2
cmake -S "$SRC/vendor/llama.cpp" -B "$OUT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON "${ISA[@]}" >&2
cmake --build "$OUT/build" --target llama-bench llama-server -j "$(nproc)" >&2
echo "$OUT/build/bin"
