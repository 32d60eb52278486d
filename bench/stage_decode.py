"""`python -m bench.stage_decode`: decode throughput at batch 16 with 2 pipeline stages against 1, on the same
cores (#28).

Each configuration runs its stages as processes of their own (`python -m engine.stages`), the cores split between
them (`TVM_NUM_THREADS` = cores / stages), driven over gRPC by this process (`engine.stages.RemotePipeline`):
- 1 stage: the whole model in one process, `decode` of the batch;
- 2 stages: `decode_microbatched` (the batch cut in two micro-batches flowing through the stages at once), and plain
  `decode` (one batch, the stages one after the other) for comparison.
The configurations alternate per round; tokens/s is the median over rounds. Also printed: the hidden-state bytes
one hop carries per step.

    python -m bench.stage_decode [--model GGUF] [--batch 16] [--steps 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _start(model: Path, cache: Path, stages: int, token: str) -> tuple[list[subprocess.Popen], list[str]]:
    threads = max(1, len(os.sched_getaffinity(0)) // stages)
    env = {**os.environ, "PDSERVE_CLUSTER_TOKEN": token, "TVM_NUM_THREADS": str(threads)}
    procs = []
    for i in range(stages):
        cmd = [sys.executable, "-m", "engine.stages", "--model", str(model), "--stage", f"{i}/{stages}"]
        cmd += ["--cache-dir", str(cache), "--max-total-seq-len", "4096"]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
    addresses = []
    for p in procs:
        m = re.search(r"stage ready on (\S+)", p.stdout.readline())
        if m is None:
            raise RuntimeError("a stage process did not start")
        addresses.append(m.group(1))
    return procs, addresses


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.stdin.close()
        p.wait(60)


def _measure(pipe, mode: str, batch: int, steps: int, vocab: int) -> float:
    """Tokens per second of `steps` decode steps of `batch` fresh sequences (64-token prompts)."""
    rng = np.random.default_rng(0)
    seqs = list(range(1, batch + 1))
    for s in seqs:
        pipe.add_sequence(s)
    try:
        pipe.prefill(seqs, [[int(t) for t in rng.integers(0, vocab, 64)] for _ in seqs])
        tokens = [1] * batch
        step = pipe.decode_microbatched if mode == "microbatched" else pipe.decode
        step(seqs, tokens)  # warm
        t0 = time.perf_counter()
        for _ in range(steps):
            step(seqs, tokens)
        return batch * steps / (time.perf_counter() - t0)
    finally:
        for s in seqs:
            pipe.remove_sequence(s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stage_decode", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    from engine.stages import RemotePipeline, StageClient
    from kvtransfer.auth import new_cluster_token
    from llama_relax.bench_model import cpu_description
    from llama_relax.compile import default_cache_dir
    from llama_relax.loader import load_config, resolve_model
    from llama_relax.models import default_model_path

    cache = default_cache_dir()
    model = args.model or default_model_path(cache)
    config = load_config(resolve_model(model))
    token = new_cluster_token()
    print(f"CPU: {cpu_description()}; {len(os.sched_getaffinity(0))} cores split among the stages", flush=True)
    runs: dict[str, list[float]] = {"1 stage": [], "2 stages, micro-batched": [], "2 stages, one batch": []}
    for r in range(args.rounds):
        for stages in (1, 2) if r % 2 == 0 else (2, 1):
            procs, addresses = _start(model, cache, stages, token)
            pipe = RemotePipeline([StageClient(a, token) for a in addresses], config.vocab_size, 512)
            try:
                if stages == 1:
                    runs["1 stage"].append(_measure(pipe, "plain", args.batch, args.steps, config.vocab_size))
                else:
                    for mode, label in (("microbatched", "2 stages, micro-batched"), ("plain", "2 stages, one batch")):
                        runs[label].append(_measure(pipe, mode, args.batch, args.steps, config.vocab_size))
            finally:
                pipe.close()
                _stop(procs)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in runs.items()), flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in med.items():
        print(f"{k:26s} {v:8.1f} tok/s = {v / med['1 stage']:.3f}x one stage")
    hop = args.batch * config.hidden_size * 4
    print(f"hidden states per hop and step: {hop} bytes ({args.batch} x {config.hidden_size} float32)")
    print(json.dumps({"median_tok_s": med, "rounds": runs, "hop_bytes": hop}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
