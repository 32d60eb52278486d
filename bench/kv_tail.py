"""`python -m bench.kv_tail`: the KV hand-off table of issue #17, measured in one run.

For each prompt length it launches `pdserve serve` (1 prefill + 1 decode worker, every prompt prefilled remotely)
and runs `pdserve bench` with one request at a time, then prints, from the server's own timings: TTFT, the KV tail
(prefill end until the decode worker holds all the KV: what a user feels between tokens 1 and 2), its share of
TTFT, the export / wire / import parts (summed over the pieces of a streamed prompt; the pieces before the last
overlap the prefill) and the serving KV rate against `pdserve bench-kv`'s warm transport rate, measured first in
the same run. `--serve-flags "--no-kv-stream"` gives the one-shot hand-off to compare with.

    python -m bench.kv_tail --model $GGUF --lengths 512,2000,8000
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class Row:
    tokens: int
    ttft_ms: float
    tail_ms: float
    export_ms: float
    wire_ms: float
    import_ms: float
    kv_mib: float
    completed: int

    @property
    def share(self) -> float:
        return self.tail_ms / self.ttft_ms

    @property
    def wire_mib_s(self) -> float:
        return self.kv_mib / (self.wire_ms / 1000) if self.wire_ms > 0 else float("nan")

    @property
    def e2e_mib_s(self) -> float:
        spent = self.export_ms + self.wire_ms + self.import_ms
        return self.kv_mib / (spent / 1000) if spent > 0 else float("nan")


def _pdserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "pdserve", *args]


def bench_kv(model: str, tokens: int) -> dict[str, float]:
    out = subprocess.run(
        _pdserve("bench-kv", "--model", model, "--tokens", str(tokens), "--json", "--no-bare"),
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def serve_run(model: str, tokens: int, args: argparse.Namespace, out_dir: Path) -> Row:
    flags = f"--model {shlex.quote(model)} --local-prefill-max-tokens 0 {args.serve_flags}".strip()
    cmd = _pdserve(
        "bench",
        f"--launch={flags}",
        "--num-prompts",
        str(args.num_prompts),
        "--input-len",
        str(tokens),
        "--output-len",
        str(args.output_len),
        "--max-concurrency",
        "1",
        "--ignore-eos",
        "--seed",
        str(args.seed),
        "--warmup",
        "1",
        "--no-progress",
        "--out",
        str(out_dir),
    )
    print(f"kv_tail: {tokens} tokens: {shlex.join(cmd[2:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if args.quiet else None)
    doc = json.loads((out_dir / "results.json").read_text())
    (run,) = doc["runs"]
    m = run
    b = m["server_breakdown_s"]
    if not b:
        raise RuntimeError(f"{tokens} tokens: no request completed ({m['failures_by_code']})")
    return Row(
        tokens,
        m["ttft_ms"]["p50"],
        1000 * b["kv_tail_s"],
        1000 * b["kv_export_s"],
        1000 * b["kv_wire_s"],
        1000 * b["kv_import_s"],
        m["kv_bytes_per_request"] / MIB,
        m["completed"],
    )


def table(rows: list[Row], kv: dict[str, float]) -> str:
    warm = kv["transfer_mib_s"]
    kv_e2e = kv["bytes"] / MIB / (kv["end_to_end_ms"] / 1000)
    lines = [
        f"bench-kv ({kv['tokens']} tokens, same run): warm wire {warm:.0f} MiB/s; export + wire + import "
        f"{kv['end_to_end_ms']:.1f} ms ({kv_e2e:.0f} MiB/s)",
        "",
        "| prompt | TTFT p50 (ms) | KV tail (ms) | tail / TTFT | export / wire / import (ms, summed) | KV (MiB) "
        "| wire rate (MiB/s, x bench-kv) | export+wire+import rate (MiB/s, x bench-kv) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.tokens} | {r.ttft_ms:.0f} | {r.tail_ms:.1f} | {100 * r.share:.2f}% | {r.export_ms:.1f} / "
            f"{r.wire_ms:.1f} / {r.import_ms:.1f} | {r.kv_mib:.1f} | {r.wire_mib_s:.0f} ({r.wire_mib_s / warm:.2f}x) "
            f"| {r.e2e_mib_s:.0f} ({r.e2e_mib_s / kv_e2e:.2f}x) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv_tail", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("PDSERVE_TEST_GGUF"), help="a .gguf or HF dir")
    p.add_argument("--lengths", default="512,2000,8000", help="prompt lengths, comma-separated")
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--serve-flags", default="", help="more `pdserve serve` flags (e.g. --no-kv-stream)")
    p.add_argument("--kv-tokens", type=int, default=2000, help="prompt length of the bench-kv reference")
    p.add_argument("--out", type=Path, default=None, help="keep each run's results.json under DIR/<tokens>/")
    p.add_argument("--quiet", action="store_true", help="hide the bench tables of the single runs")
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model is required (or set PDSERVE_TEST_GGUF)")
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if not lengths or min(lengths) <= 0:
        p.error("--lengths: positive integers, e.g. 512,2000,8000")
    print(f"kv_tail: bench-kv --tokens {args.kv_tokens} ...", file=sys.stderr, flush=True)
    kv = bench_kv(args.model, args.kv_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.out or Path(tmp)
        for n in lengths:
            rows.append(serve_run(args.model, n, args, base / str(n)))
    print(table(rows, kv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
