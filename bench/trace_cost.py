"""`python -m bench.trace_cost`: what request tracing costs, measured side by side in one run.

It starts an OTLP/HTTP trace sink on 127.0.0.1 (`bench.otlp_sink`), then runs `pdserve bench --compare` on the
same workload against `pdserve serve FLAGS` without and with `--otlp-traces-endpoint` pointed at the sink, in
both orders (`--rounds`, alternating, so drift between runs on a shared machine falls on both sides), and prints
decode ITL p50 / p99, TTFT p50 and TPOT p50 for each, the ratio on/off, and how many traces the sink received.

    python -m bench.trace_cost --model $GGUF --serve-flags "--colocated 1"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.otlp_sink import OtlpReceiver


def bench_pair(args: argparse.Namespace, flags_a: str, flags_b: str, out: Path) -> tuple[dict, dict]:
    cmd = [sys.executable, "-m", "pdserve", "bench", "--compare", flags_a, flags_b, "--out", str(out)]
    cmd += ["--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len)]
    cmd += ["--output-len", str(args.output_len), "--max-concurrency", str(args.concurrency)]
    cmd += ["--ignore-eos", "--seed", str(args.seed), "--warmup", "2", "--no-progress"]
    print(f"trace_cost: {shlex.join(cmd[2:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if args.quiet else None)
    runs = json.loads((out / "results.json").read_text())["runs"]
    a, b = runs
    return a, b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trace_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("PDSERVE_TEST_GGUF"), help="a .gguf or HF dir")
    p.add_argument("--serve-flags", default="", help="more `pdserve serve` flags for both sides")
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2, help="runs of the pair, alternating which side goes first")
    p.add_argument("--quiet", action="store_true", help="hide the bench tables of the single runs")
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model is required (or set PDSERVE_TEST_GGUF)")
    sink = OtlpReceiver()
    base = f"--model {shlex.quote(args.model)} {args.serve_flags}".strip()
    traced = f"{base} --otlp-traces-endpoint {sink.endpoint}"
    rows: list[tuple[str, dict]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.rounds):
                first, second = (base, traced) if i % 2 == 0 else (traced, base)
                a, b = bench_pair(args, first, second, Path(tmp) / str(i))
                for flags, run in ((first, a), (second, b)):
                    rows.append(("on" if flags == traced else "off", run))
    finally:
        sink.close()
    traces = sum(1 for s in sink.spans if s.name == "request")
    print(f"\ntrace cost ({args.rounds} rounds, alternating; {base}); the sink received {traces} traces\n")
    print("| tracing | ITL p50 (ms) | ITL p99 (ms) | TTFT p50 (ms) | TPOT p50 (ms) | completed |")
    print("|---|---|---|---|---|---|")
    for side, run in rows:
        print(
            f"| {side} | {run['itl_ms']['p50']:.2f} | {run['itl_ms']['p99']:.2f} | {run['ttft_ms']['p50']:.1f} "
            f"| {run['tpot_ms']['p50']:.2f} | {run['completed']} |"
        )
    on = statistics.median(r["itl_ms"]["p50"] for s, r in rows if s == "on")
    off = statistics.median(r["itl_ms"]["p50"] for s, r in rows if s == "off")
    print(f"\nITL p50, median over rounds: on {on:.2f} ms, off {off:.2f} ms: on/off = {on / off:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
