#!/usr/bin/env bash
# The device check: one command on a machine with one CUDA GPU, at most ~8 minutes. Prints one line per check
# (PASS / FAIL / NOT RUN and why) and exits non-zero if any check failed. Logs go to $OUT (default /tmp/gpu-check).
#
#   bash tests/gpu/run.sh
#
# 1. tiny configs: every method on CUDA against the NumPy float64 reference (fp32 and fp16)
# 2. the bundled SmolLM2 GGUF on CUDA (fp16, its 4-bit blocks): greedy tokens equal to the CPU build's
# 3. `pdserve bench-model --target cuda` (prefill tok/s, decode ms per step at batch 1 and 16)
# 4. device KV export/import round trip, bit-identical (and the NCCL push, which needs two GPUs)
# 5. `pdserve serve --target cuda`, 1 prefill + 1 decode worker on the one GPU (host gRPC transfer: NCCL refuses
#    two ranks on one GPU): greedy output equal to the CPU server's, same requests
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled
export PDSERVE_CACHE_DIR="${PDSERVE_CACHE_DIR:-$PWD/.pdserve-cache}"
if ! python3 -c "import llama_relax, cupy" 2>/dev/null; then
  if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
  python -m pip install --quiet -e '.[test,cuda]' >"$OUT/install.log" 2>&1 || { echo "FAIL install (see $OUT/install.log)"; exit 1; }
fi
PDSERVE_TEST_GGUF="$(pdserve fetch-model 2>/dev/null)"
export PDSERVE_TEST_GGUF
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
failed=0
check() {  # check NAME TIMEOUT_S COMMAND...: one line, the log in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "PASS $name ($((SECONDS - t0)) s) $(grep -h '^RESULT' "$OUT/$name.log" | tail -1 | cut -c8-)"
  else
    echo "FAIL $name ($((SECONDS - t0)) s): $(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-200)"
    failed=1
  fi
}
check 1-tiny-parity 150 python -m pytest -q -p no:cacheprovider "tests/gpu/test_cuda_model.py::test_methods_match_the_reference_on_cuda"
check 2-bundled-greedy 150 python -m pytest -q -s -p no:cacheprovider "tests/gpu/test_cuda_model.py::test_the_bundled_model_on_cuda_gives_the_cpu_tokens"
check 3-bench-model 120 pdserve bench-model --target cuda --dtype float16 --repeats 2
check 4-kv-device 90 python -m pytest -q -rs -p no:cacheprovider tests/gpu/test_nccl_gpu.py
if grep -q "two CUDA devices" "$OUT/4-kv-device.log" && grep -q "skipped" "$OUT/4-kv-device.log"; then
  echo "NOT RUN 4b-nccl-push: needs two GPUs ($(nvidia-smi -L 2>/dev/null | wc -l) visible)"
fi
check 5-serve-cuda 240 pdserve bench --compare "--target cuda --dtype float16" "--max-total-seq-len 2048" \
  --num-prompts 4 --input-len 32 --output-len 8 --ignore-eos --request-rate inf --seed 3 --out "$OUT/serve"
if [[ -f "$OUT/5-serve-cuda.log" ]] && ! grep -q "Same tokens on A and B .*: 4/4" "$OUT/5-serve-cuda.log"; then
  echo "FAIL 5-serve-cuda: greedy output differs from the CPU server's ($(grep -h 'Same tokens' "$OUT/5-serve-cuda.log"))"
  failed=1
fi
exit $failed
