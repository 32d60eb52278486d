"""`pdserve bench-model`: prefill and decode speed of the compiled model, with a NumPy (BLAS) baseline of the
same matmul shapes measured in the same run, and the ratios between them.

NumPy baseline: for T tokens, every linear layer's `[T, in] @ [in, out]` (30 layers of qkv, o, gate_up, down)
plus the LM head for the rows that need logits. It is matmul-only (no attention, norms or rope), so it is an
upper bound on what a BLAS-backed implementation of the same model could reach.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llama_relax.bench_peers import llama_cpp_peer, torch_peer

PREFILL_LENGTHS = (128, 512)
DECODE_BATCHES = (1, 4, 16)
DECODE_CONTEXT = 64
DECODE_STEPS = 8


def _best_of(fn: Callable[[], None], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def numpy_matmul_time(params: dict[str, np.ndarray], n_layers: int, rows: int, logit_rows: int, repeats: int) -> float:
    """Seconds for the model's matmuls on `rows` tokens (float32 BLAS), LM head on `logit_rows` rows."""
    rng = np.random.default_rng(0)
    layer_ws = []
    for i in range(n_layers):
        pre = f"model.layers.{i}."
        layer_ws.append(
            [
                params[pre + n]
                for n in (
                    "self_attn.qkv_proj.weight",
                    "self_attn.o_proj.weight",
                    "mlp.gate_up_proj.weight",
                    "mlp.down_proj.weight",
                )
            ]
        )
    head = params.get("lm_head.weight", params["model.embed_tokens.weight"])  # [V, h]
    xs = {w.shape[0]: rng.standard_normal((rows, w.shape[0])).astype(np.float32) for ws in layer_ws for w in ws}
    last = rng.standard_normal((logit_rows, head.shape[1])).astype(np.float32)

    def run() -> None:
        for ws in layer_ws:
            for w in ws:
                xs[w.shape[0]] @ w
        last @ head.T

    run()  # warm-up
    return _best_of(run, repeats)


def run_bench_model(args: argparse.Namespace) -> int:
    from llama_relax.compile import resolve_target
    from llama_relax.kv_dtype import kv_bytes_per_token
    from llama_relax.loader import load_params
    from llama_relax.models import open_model
    from llama_relax.runtime import KVCacheConfig

    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    kv = KVCacheConfig(max_batch_size=max(DECODE_BATCHES) + 1, max_total_seq_len=8192, prefill_chunk_size=512)
    t_open = time.perf_counter()
    model = open_model(
        args.model,
        dtype=args.dtype,
        target=resolve_target(args.target),
        cache_dir=args.cache_dir,
        kv=kv,
        quiet=args.json,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    load_s = time.perf_counter() - t_open
    load_peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rt, cfg = model.runtime, model.config
    rng = np.random.default_rng(0)
    seq = iter(range(1_000_000))
    weights_mb = (
        sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in model.compiled.param_specs) / 2**20
    )
    kv_per_token = kv_bytes_per_token(cfg, model.compiled.kv_dtype)
    result: dict[str, object] = {
        "model": str(model.source.path),
        "dtype": args.dtype,
        "kv_cache_dtype": model.compiled.kv_dtype,
        "kv_bytes_per_token": kv_per_token,
        "kv_cache_mb": model.runtime.kv_cache_bytes / 2**20,
        "quantization": model.compiled.plan.summary(),
        "target": model.compiled.target.describe(),
        "cpu": cpu_description(),
        "threads": int(os.environ.get("TVM_NUM_THREADS", "0")) or len(os.sched_getaffinity(0)),
        "weights_mb": weights_mb,
        "load_s": load_s,
        "load_peak_rss_mb": load_peak_rss_mb,
        "compile_s": model.compiled.build_s,
    }
    log(f"{result['cpu']}, {result['threads']} threads; {result['quantization']}; weights {weights_mb:.0f} MB")
    log(
        f"KV cache {model.compiled.kv_dtype}: {kv_per_token} bytes/token, {result['kv_cache_mb']:.0f} MB "
        f"(--max-total-seq-len {kv.max_total_seq_len})"
    )
    try:
        prefill_tok_s = {}
        for n in PREFILL_LENGTHS:
            prompt = [int(t) for t in rng.integers(0, cfg.vocab_size, n)]

            def one_prefill(prompt: list[int] = prompt) -> None:
                sid = next(seq)
                rt.add_sequence(sid)
                try:
                    rt.prefill([sid], [prompt])
                finally:
                    rt.remove_sequence(sid)

            one_prefill()  # warm-up
            prefill_tok_s[str(n)] = n / _best_of(one_prefill, args.repeats)
            log(f"prefill {n:4d} tokens: {prefill_tok_s[str(n)]:8.1f} tok/s")
        decode_ms = {}
        for b in DECODE_BATCHES:
            sids = [next(seq) for _ in range(b)]
            for s in sids:
                rt.add_sequence(s)
            try:
                rt.prefill(sids, [[int(t) for t in rng.integers(0, cfg.vocab_size, DECODE_CONTEXT)] for _ in sids])
                toks = [1] * b
                rt.decode(sids, toks)  # warm-up
                t = _best_of(
                    lambda sids=sids, toks=toks: [rt.decode(sids, toks) for _ in range(DECODE_STEPS)], args.repeats
                )
                decode_ms[str(b)] = 1000 * t / DECODE_STEPS
            finally:
                for s in sids:
                    rt.remove_sequence(s)
            log(f"decode batch {b:2d}: {decode_ms[str(b)]:8.2f} ms/step ({1000 * b / decode_ms[str(b)]:.1f} tok/s)")
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        params = load_params(model.source, cfg, "float32")
        np_prefill = {
            str(n): n / numpy_matmul_time(params, cfg.num_hidden_layers, n, 1, args.repeats) for n in PREFILL_LENGTHS
        }
        np_decode = {
            str(b): 1000 * numpy_matmul_time(params, cfg.num_hidden_layers, b, b, args.repeats) for b in DECODE_BATCHES
        }
        del params
    finally:
        model.close()
    tok_s = {b: 1000 * int(b) / ms for b, ms in decode_ms.items()}
    result.update(
        prefill_tok_s=prefill_tok_s,
        numpy_prefill_tok_s=np_prefill,
        prefill_ratio_vs_numpy={n: prefill_tok_s[n] / np_prefill[n] for n in prefill_tok_s},
        decode_ms_per_step=decode_ms,
        numpy_decode_ms_per_step=np_decode,
        decode_tok_s=tok_s,
        decode_batch16_speedup=tok_s["16"] / tok_s["1"],
        peak_rss_mb=peak_rss_mb,
    )
    if args.peers:
        gguf = model.source.path if model.source.kind == "gguf" else None
        peers = (
            []
            if gguf is None
            else [
                llama_cpp_peer(args.llama_bench, gguf, int(result["threads"])),
                torch_peer(gguf, int(result["threads"]), args.torch_python),
            ]
        )
        result["peers"] = {p.name: dataclasses.asdict(p) for p in peers}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"\n{'':24s}{'ours':>12s}{'numpy matmuls':>16s}{'ratio':>8s}")
    for n in prefill_tok_s:
        print(
            f"prefill {n:>4s} tok (tok/s) {prefill_tok_s[n]:12.1f}{np_prefill[n]:16.1f}"
            f"{prefill_tok_s[n] / np_prefill[n]:8.2f}"
        )
    for b in decode_ms:
        print(
            f"decode b={b:>2s} (ms/step)   {decode_ms[b]:12.2f}{np_decode[b]:16.2f}{np_decode[b] / decode_ms[b]:8.2f}"
        )
    print(
        f"decode tok/s batch 16 / batch 1: {result['decode_batch16_speedup']:.2f}x   peak RSS {peak_rss_mb:.0f} MB "
        f"(after loading {load_peak_rss_mb:.0f} MB, weights {weights_mb:.0f} MB)"
    )
    for p in result.get("peers", {}).values():
        if p["skipped"]:
            print(f"peer {p['name']}: skipped ({p['skipped']})")
            continue
        print(
            f"peer {p['name']:10s} prefill 512: {p['prefill_tok_s']:8.1f} tok/s (ours / peer "
            f"{prefill_tok_s['512'] / p['prefill_tok_s']:.2f}x)   decode b=1: {p['decode_ms']:6.2f} ms/token (ours / "
            f"peer {decode_ms['1'] / p['decode_ms']:.2f}x)   [{p['detail']}]"
        )
    return 0


def cpu_description() -> str:
    """The CPU's model name and the ISA the kernels were built for (reported with every figure)."""
    import tvm

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "SSE")
    return f"{name} (LLVM {cpu}, {isa})"
