"""`python -m bench.trace_cost`: what request tracing costs, measured side by side in one run.

It starts an OTLP/HTTP trace sink on 127.0.0.1 (`bench.otlp_sink`), then runs `pdserve bench --compare` on the
same workload against `pdserve serve FLAGS` without and with `--otlp-traces-endpoint` pointed at the sink, in
both orders (`--rounds`, alternating, so drift between runs on a shared machine falls on both sides), and prints
decode ITL p50 / p99, TTFT p50 and TPOT p50 for each, the ratio on/off (per round and over rounds), how many
traces the sink received, and the tracer's own CPU per request (measured in-process on synthetic records).

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
import time
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


def tracer_cpu_per_request(sink: OtlpReceiver, n: int = 300) -> float:
    """CPU seconds the router's tracer spends per request (start, propagate, end with its 7 spans, and the
    export), measured in this process on synthetic records against the sink: what tracing adds to a request."""
    from engine.messages import ChunkTiming, GenerationRequest, PrefillResult
    from llama_relax.sampling import SamplingParams
    from router.record import Outcome, RequestRecord, RequestState
    from router.tracing import Tracer

    tracer = Tracer(sink.endpoint)
    req = GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=64))
    t0 = time.process_time()
    for i in range(n):
        rec = RequestRecord(f"r{i}", 128)
        span = tracer.start(rec)
        tracer.propagate(req, span)
        for state in (RequestState.RESERVED, RequestState.PREFILLING, RequestState.KV_TRANSFER):
            rec.mark(state)
        now = time.time_ns()
        chunks = (ChunkTiming(now, now + 1000, 0, 64), ChunkTiming(now + 1000, now + 2000, 64, 128))
        rec.prefill = PrefillResult("r", None, kv_pieces=2, kv_bytes=1 << 20, chunks=chunks)
        rec.prefill_done_at = time.monotonic()
        for _ in range(64):
            rec.on_token(time.monotonic())
        rec.finish(Outcome.FINISHED, "length")
        tracer.end(span, rec)
    tracer.shutdown()  # exports what is left: its CPU counts too
    return (time.process_time() - t0) / n


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
    p.add_argument("--micro-only", action="store_true", help="only the tracer's own CPU per request")
    args = p.parse_args(argv)
    if args.micro_only:
        sink = OtlpReceiver()
        try:
            print(f"the tracer's own CPU per request: {1e6 * tracer_cpu_per_request(sink):.0f} us")
        finally:
            sink.close()
        return 0
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
    pairs = [rows[i : i + 2] for i in range(0, len(rows), 2)]
    ratios = [
        (a if a[0] == "on" else b)[1]["itl_ms"]["p50"] / (b if a[0] == "on" else a)[1]["itl_ms"]["p50"]
        for a, b in pairs
    ]
    print("ITL p50 on/off within each round: " + ", ".join(f"{r:.3f}" for r in ratios))
    on = statistics.median(r["itl_ms"]["p50"] for s, r in rows if s == "on")
    off = statistics.median(r["itl_ms"]["p50"] for s, r in rows if s == "off")
    print(f"ITL p50, median over rounds: on {on:.2f} ms, off {off:.2f} ms: on/off = {on / off:.3f}")
    sink = OtlpReceiver()
    try:
        cpu = tracer_cpu_per_request(sink)
    finally:
        sink.close()
    e2e_s = statistics.median(r["e2e_ms"]["p50"] for _, r in rows) / 1000
    print(
        f"the tracer's own CPU per request: {1e6 * cpu:.0f} us (spans + export), against a median request of "
        f"{e2e_s:.2f} s on 2 cores: {100 * cpu / (2 * e2e_s):.3f}% of the CPU a request occupies"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
