"""`python -m bench.stage_decode`: decode throughput at batch 16 with 2 pipeline stages against 1, on the same
cores (#28).

Every configuration runs the decode engine's own step (`engine.decode_batch.DecodeBatch`: plan, forward, greedy
sampling, streaming) over `batch` sequences with 64-token prompts, in a fresh process of its own:
- `1 stage`: a one-stage decode worker's runtime, the whole model in this process (`TVM_NUM_THREADS` = cores);
- `2 stages, pipelined`: the stages as processes of their own (`python -m engine.stages`, cores / 2 threads each)
  behind `engine.staged_runtime.StagedRuntime`; the step keeps 2 groups of 8 in flight across steps (what a
  pipelined decode worker runs);
- `2 stages, micro-batched per step`: the same stages, each step's batch cut in 2 micro-batches that flow through
  the stages at once, the step waiting for both (the runtime's synchronous `decode`).
Rounds alternate the order; tokens/s is the median over rounds. Also printed: what one hop carries per step, and
stage 0's forward alone against beside stage 1 running on the other core.

    python -m bench.stage_decode [--model GGUF] [--batch 16] [--steps 24] [--rounds 5]
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

CONFIGS = ("1 stage", "2 stages, pipelined", "2 stages, micro-batched per step")
PROMPT = 64


def _start_stages(model: Path, cache: Path, stages: int, token: str) -> tuple[list[subprocess.Popen], list[str]]:
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


def _decode(runtime, config, batch: int, steps: int, depth: int) -> float:
    """Tokens/s of the engine's decode step over `batch` prefilled sequences (greedy), after a warm-up."""
    from engine.decode_batch import DecodeBatch, DecodeSequence, DecodeState
    from engine.loop import OutputStream
    from engine.messages import GenerationRequest
    from engine.pages import PagePool
    from llama_relax.generation import SequenceDecoder
    from llama_relax.sampling import SamplingParams

    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=10_000, temperature=0)
    seqs = []
    for i in range(batch):
        prompt = [int(t) for t in rng.integers(0, config.vocab_size, PROMPT)]
        runtime.add_sequence(i + 1)
        step = runtime.prefill_chunk_size
        for c in range(0, PROMPT, step):  # the prompt in chunks the runtime takes
            h = runtime.forward_hidden([i + 1], [prompt[c : c + step]])
        first = int(runtime.logits_at(h, [len(prompt[c : c + step]) - 1])[0].argmax())
        req = GenerationRequest(f"b{i}", tuple(prompt), params)
        s = DecodeSequence(
            req, i + 1, SequenceDecoder(params, None, PROMPT, 1 << 20, set()), OutputStream(), DecodeState.DECODING
        )
        s.length, s.last_token = PROMPT, first
        seqs.append(s)
    engine = DecodeBatch(runtime, PagePool(total=batch * 64), batch)
    engine.depth = depth
    try:
        for _ in range(4):
            engine.step(seqs)
        done0, t0 = sum(len(s.decoder.output_ids) for s in seqs), time.perf_counter()
        for _ in range(steps):
            engine.step(seqs)
        tokens = sum(len(s.decoder.output_ids) for s in seqs) - done0
        return tokens / (time.perf_counter() - t0)
    finally:
        while engine.flights:
            engine.step([])
        for s in seqs:
            runtime.remove_sequence(s.seq_id)


def _one(label: str, model: Path, batch: int, steps: int) -> dict:
    """Measure one configuration in this process; its tokens/s and hop figures."""
    from kvtransfer.auth import new_cluster_token
    from llama_relax.compile import default_cache_dir
    from llama_relax.loader import load_config, resolve_model
    from llama_relax.runtime import KVCacheConfig

    cache = default_cache_dir()
    config = load_config(resolve_model(model))
    kv = KVCacheConfig(batch, 4096, prefill_chunk_size=512)
    if label == "1 stage":
        from llama_relax.models import open_model
        from llama_relax.process import use_all_cores

        use_all_cores()
        m = open_model(model, cache_dir=cache, kv=kv, quiet=True)
        try:
            return {"tok_s": _decode(m.runtime, config, batch, steps, 1)}
        finally:
            m.close()
    from engine.staged_runtime import StagedRuntime
    from engine.stages import StageClient

    token = new_cluster_token()
    procs, addresses = _start_stages(model, cache, 2, token)
    rt = StagedRuntime([StageClient(a, token) for a in addresses], config, kv, _lost, cache)
    try:
        out = {"tok_s": _decode(rt, config, batch, steps, 2 if "pipelined" in label else 1)}
        if "pipelined" in label:
            out |= {"hops_ms": _hops(rt, -(-batch // 2)), "beside_ms": _beside(rt, -(-batch // 2))}
        return out
    finally:
        rt.close()
        for p in procs:
            p.stdin.close()
            p.wait(60)


def _hops(rt, group: int, calls: int = 16) -> dict[str, float]:
    """Median ms of each call of one group's decode forward, alone (nothing else in flight): the lookup of stage
    0's input rows (on the last stage, which holds the tied table), stage 0 (token rows in, hidden states out) and
    stage 1 (hidden states in, logits out), each as the driver sees it (serialization and the hop included)."""
    from engine.stages import from_array

    ids = list(range(101, 101 + group))
    times: dict[str, list[float]] = {"lookup": [], "stage 0": [], "stage 1": []}
    for sid in ids:
        rt.add_sequence(sid)
        rt.forward_hidden([sid], [[1] * 8])
    try:
        for _ in range(calls):
            t0 = time.perf_counter()
            x = rt._first_input(np.ones(group, np.int32))
            t1 = time.perf_counter()
            h = from_array(rt.clients[0].forward(rt._request(0, ids, [1] * group, x, ())).hidden, "hidden")
            t2 = time.perf_counter()
            rt.clients[1].forward(rt._request(1, ids, [1] * group, h, list(range(group))))
            t3 = time.perf_counter()
            for k, a, b in (("lookup", t0, t1), ("stage 0", t1, t2), ("stage 1", t2, t3)):
                times[k].append(1000 * (b - a))
            rt._grown(ids, [1] * group)  # the stages appended a token each
    finally:
        for sid in ids:
            rt.remove_sequence(sid)
    return {k: statistics.median(v) for k, v in times.items()}


def _beside(rt, group: int, calls: int = 24) -> dict[str, float]:
    """Median ms of stage 0's forward of a group alone, and while stage 1 runs forwards of another group on the
    other core without a pause (logits back, as in decode): what running side by side costs a stage here."""
    import threading

    from engine.stages import from_array

    a, b = list(range(301, 301 + group)), list(range(401, 401 + group))
    for sid in a + b:
        rt.add_sequence(sid)
        rt.forward_hidden([sid], [[1] * 8])
    x = rt._first_input(np.ones(group, np.int32))
    h = from_array(rt.clients[0].forward(rt._request(0, b, [1] * group, x, ())).hidden, "hidden")
    rt._grown(b, [1] * group)
    stop, looped = threading.Event(), [0]

    def loop() -> None:
        while not stop.is_set():
            rt.clients[1].forward(rt._request(1, b, [1] * group, h, list(range(group))))
            looped[0] += 1

    def stage0() -> float:
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            rt.clients[0].forward(rt._request(0, a, [1] * group, x, ()))
            times.append(1000 * (time.perf_counter() - t0))
        rt._grown(a, [calls] * group)
        return statistics.median(times)

    try:
        alone = stage0()
        other = threading.Thread(target=loop)
        other.start()
        try:
            beside = stage0()
        finally:
            stop.set()
            other.join()
        rt._grown(b, [looped[0]] * group)
    finally:
        for sid in a + b:
            rt.remove_sequence(sid)
    return {"alone": alone, "beside": beside}


def _lost(e: BaseException) -> None:
    raise SystemExit(f"a stage died: {e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stage_decode", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # a child: measure this configuration
    args = p.parse_args(argv)
    from llama_relax.bench_model import cpu_description
    from llama_relax.compile import default_cache_dir
    from llama_relax.loader import load_config, resolve_model
    from llama_relax.models import default_model_path

    model = args.model or default_model_path(default_cache_dir())
    if args.one:
        print(json.dumps(_one(args.one, model, args.batch, args.steps)))
        return 0
    config = load_config(resolve_model(model))
    print(f"CPU: {cpu_description()}; {len(os.sched_getaffinity(0))} cores; batch {args.batch}", flush=True)
    runs: dict[str, list[float]] = {c: [] for c in CONFIGS}
    hops: list[dict[str, float]] = []
    beside: list[dict[str, float]] = []
    for r in range(args.rounds):
        for label in CONFIGS if r % 2 == 0 else CONFIGS[::-1]:
            cmd = [sys.executable, "-m", "bench.stage_decode", "--one", label, "--model", str(model)]
            cmd += ["--batch", str(args.batch), "--steps", str(args.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1200).stdout
            result = json.loads(out.strip().splitlines()[-1])
            runs[label].append(result["tok_s"])
            hops += [result["hops_ms"]] if "hops_ms" in result else []
            beside += [result["beside_ms"]] if "beside_ms" in result else []
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()) + " tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in med.items():
        print(f"{k:34s} {v:8.1f} tok/s = {v / med['1 stage']:.3f}x one stage")
    group = -(-args.batch // 2)
    rows, logits = group * config.hidden_size * 4, group * config.vocab_size * 4
    hop_ms = {k: statistics.median(h[k] for h in hops) for k in hops[0]}
    print(f"one group of {group} alone, per call as the driver sees it (medians):")
    print(f"  lookup  {hop_ms['lookup']:6.2f} ms  ids -> {rows} bytes of input rows, from the last stage")
    print(f"  stage 0 {hop_ms['stage 0']:6.2f} ms  {rows} bytes of rows in, {rows} bytes of hidden states out")
    print(f"  stage 1 {hop_ms['stage 1']:6.2f} ms  {rows} bytes of hidden states in, {logits} bytes of logits out")
    side = {k: statistics.median(b[k] for b in beside) for k in ("alone", "beside")}
    print(
        f"stage 0's forward of a group: {side['alone']:.2f} ms alone, {side['beside']:.2f} ms while stage 1 computes"
        f" on the other core ({side['beside'] / side['alone']:.2f}x)"
    )
    print(json.dumps({"median_tok_s": med, "rounds": runs, "hop_bytes": rows, "hop_ms": hop_ms, "beside_ms": side}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
