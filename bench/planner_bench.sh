#!/usr/bin/env bash
# #29 benchmark: the planner (decode 1:2) against each fixed size in the range, one schedule, one seed.
set -u
cd "$(dirname "$0")/.." && . .venv/bin/activate
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled
G=$(pdserve fetch-model)
SCHED="0:0.3,40:2.5,90:0.3"
COMMON="--model $G --max-total-seq-len 4096 --speculative off --kv-cache-dtype float16"
BENCH="--num-prompts 150 --input-len 128 --output-len 48 --rate-schedule $SCHED --slo ttft=3000,tpot=150 --seed 7 --no-progress"
for cfg in "planner|--decode-workers 1:2 --slo ttft=3000,itl=150 --planner-interval-s 5 --drain-timeout 30" "fixed1|--decode-workers 1" "fixed2|--decode-workers 2"; do
  name=${cfg%%|*}; flags=${cfg#*|}
  echo "=== $name: $flags"
  timeout 900 pdserve bench --launch "$COMMON $flags" $BENCH --out ${OUT:-/tmp/pbench}/$name 2>&1 | grep -v Warning | tail -40
done
