"""`python -m bench.overhead`: what serving adds to a decode step, measured side by side in one run.

Each round runs `pdserve bench-model` (the runtime's batch-1 `batch_decode` step, no server) and then `pdserve
bench` at concurrency 1 with short prompts against `pdserve serve --colocated 1 --speculative off` (TPOT: one
decode step plus everything between two streamed tokens: scheduling, sampling, the stream, gRPC), and prints
TPOT p50 / step for each round. Rounds alternate the order so drift on a shared machine falls on both sides.

    python -m bench.overhead [--model GGUF] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def model_step_ms(args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "pdserve", "bench-model", "--json", "--repeats", "5", *_model(args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["decode_ms_per_step"]["1"])


def served_tpot_ms(args: argparse.Namespace, out: Path) -> float:
    flags = " ".join(["--colocated 1 --speculative off", *_model(args), *args.serve_flags.split()])
    cmd = [sys.executable, "-m", "pdserve", "bench", "--launch", flags, "--out", str(out), "--no-progress"]
    cmd += ["--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len), "--output-len"]
    cmd += [str(args.output_len), "--max-concurrency", "1", "--ignore-eos", "--warmup", "2"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    return float(run["tpot_ms"]["p50"])


def _model(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model] if args.model else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF or HF directory (default: the bundled model)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--serve-flags", default="", help="more `pdserve serve` flags")
    args = p.parse_args(argv)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            if r % 2 == 0:
                step, tpot = model_step_ms(args), served_tpot_ms(args, Path(tmp) / f"r{r}")
            else:
                tpot, step = served_tpot_ms(args, Path(tmp) / f"r{r}"), model_step_ms(args)
            ratios.append(tpot / step)
            print(f"round {r + 1}: bench-model batch-1 step {step:.2f} ms, served TPOT p50 {tpot:.2f} ms, "
                  f"ratio {tpot / step:.3f}", flush=True)  # fmt: skip
    print(f"served TPOT / model step: median {statistics.median(ratios):.3f} over {len(ratios)} rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
