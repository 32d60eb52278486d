"""`python -m bench.stage_kv`: a prompt's KV from 2 prefill stages into 2 decode stages, straight from stage to
stage against relayed through the two drivers, side by side (#28).

Four stage processes (`python -m engine.stages`, one thread each) hold the bundled model split in two, twice: a
prefill pipeline and a decode pipeline, each behind a `StagedRuntime` in this process (the drivers). The prefill
pipeline computes one prompt; then, rounds alternating the order, its KV moves into a new decode sequence:
- `relayed`: the prefill driver reads every stage's layers (`read_kv`) and the decode driver hands each decode stage
  its own (`append_kv`): every byte passes through both drivers;
- `straight`: each prefill stage sends its layers to the decode stage holding them, both at once (`push_kv`, parts
  held by the decode stages' own receivers), then the decode driver commits them (`commit`: every stage checked,
  then appended): no KV byte passes through a driver.
Printed: the median time of each, their ratio, the bytes through the drivers, and that both give the same bits.

    python -m bench.stage_kv [--model GGUF] [--tokens 2048] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.stage_decode import _lost, _start_stages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stage_kv", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    from engine.staged_runtime import StagedRuntime
    from engine.stages import StageClient
    from kvtransfer.auth import new_cluster_token
    from kvtransfer.route import KVRoute
    from kvtransfer.runtime_io import manifest_for
    from llama_relax.bench_model import cpu_description
    from llama_relax.compile import default_cache_dir
    from llama_relax.loader import load_config, resolve_model
    from llama_relax.models import default_model_path
    from llama_relax.runtime import KVCacheConfig

    cache = default_cache_dir()
    model = args.model or default_model_path(cache)
    config = load_config(resolve_model(model))
    kv = KVCacheConfig(4, 4096, prefill_chunk_size=512)
    token = new_cluster_token()
    print(f"CPU: {cpu_description()}; {len(os.sched_getaffinity(0))} cores; {args.tokens} tokens", flush=True)
    procs, addresses = _start_stages(model, cache, 2, token)
    procs2, addresses2 = _start_stages(model, cache, 2, token)
    prefill = StagedRuntime([StageClient(a, token) for a in addresses], config, kv, _lost, cache)
    decode = StagedRuntime([StageClient(a, token) for a in addresses2], config, kv, _lost, cache)
    try:
        rng = np.random.default_rng(0)
        ids = [int(t) for t in rng.integers(0, config.vocab_size, args.tokens)]
        prefill.add_sequence(1)
        for at in range(0, args.tokens, 512):
            prefill.forward_hidden([1], [ids[at : at + 512]])
        route = KVRoute.parse(decode.kv_route("driver-unused:1"))
        n, times = args.tokens, {"relayed": [], "straight": []}
        want = prefill.read_kv(1, 0, n)
        nbytes = want[0].nbytes + want[1].nbytes
        for r in range(args.rounds):
            for label in ("relayed", "straight") if r % 2 == 0 else ("straight", "relayed"):
                sid = 100 + 2 * r + (label == "straight")
                decode.add_sequence(sid)
                t0 = time.perf_counter()
                if label == "relayed":
                    decode.append_kv(sid, *prefill.read_kv(1, 0, n))
                else:
                    result = prefill.push_kv(1, f"bench-{sid}", 0, n, route, 120.0)
                    if not result.ok:
                        raise RuntimeError(f"push failed: {result.error}: {result.message}")
                    decode.commit(sid, manifest_for(decode, 0, n, f"bench-{sid}").header)
                times[label].append(time.perf_counter() - t0)
                got = decode.read_kv(sid, 0, n)
                if got[0].tobytes() != want[0].tobytes() or got[1].tobytes() != want[1].tobytes():
                    raise RuntimeError(f"{label}: the decode stages' KV differs from the prefill stages'")
                decode.remove_sequence(sid)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()), flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"KV of {n} tokens, 30 layers: {nbytes} bytes ({nbytes / n:.0f} per token)")
        print(
            f"relayed   {med['relayed'] * 1e3:8.1f} ms   {nbytes} KV bytes into the prefill driver, {nbytes} out of the decode one"
        )
        print(f"straight  {med['straight'] * 1e3:8.1f} ms   0 KV bytes through the drivers")
        print(f"straight / relayed = {med['straight'] / med['relayed']:.3f}; the same bits on both paths")
        print(json.dumps({"median_s": med, "rounds_s": times, "kv_bytes": nbytes}))
    finally:
        prefill.close()
        decode.close()
        for proc in procs + procs2:
            proc.stdin.close()
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
