"""`python -m bench.kv_dtype`: the KV cache in float16 and q8_0 against float32, side by side in one run (#27).

- memory: KV bytes per token and the cache's size at the same `--max-total-seq-len`; each configuration's peak
  RSS, measured in a child process of its own (open the model, prefill 512 tokens, decode 16 steps);
- speed: three runtimes of the same model in this process, one per KV dtype, timed in rounds of alternating order
  (drift on a shared machine falls on all): a prefill of `--prefill` tokens (TTFT), batch-1 decode at
  `--context` tokens of context and at 32;
- accuracy: greedy tokens and the last position's logits of chat prompts, float16 and q8_0 KV against float32.

    python -m bench.kv_dtype [--model GGUF] [--rounds 3] [--prefill 8000] [--context 4000]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 100.",
    "Summarize the plot of Romeo and Juliet.",
    "How do I reverse a linked list in C?",
)
DTYPES = ("float32", "float16", "q8_0")


def _open(args: argparse.Namespace, kv_dtype: str, quantization: str = "auto", total: int = 8192):
    from llama_relax.compile import default_cache_dir
    from llama_relax.models import open_model
    from llama_relax.runtime import KVCacheConfig

    kv = KVCacheConfig(max_batch_size=4, max_total_seq_len=total, prefill_chunk_size=512)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    return open_model(
        args.model, cache_dir=cache, kv=kv, quiet=True, quantization=quantization, kv_cache_dtype=kv_dtype
    )


def child_rss(args: argparse.Namespace) -> int:
    """In a child process: open, prefill 512 tokens, decode 16 steps; print the peak RSS in MB."""
    model = _open(args, args.kv_cache_dtype, args.quantization)
    rt = model.runtime
    rt.add_sequence(0)
    rt.prefill([0], [list(np.random.default_rng(0).integers(0, rt.config.vocab_size, 512))])
    for _ in range(16):
        rt.decode([0], [1])
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


def _rss(args: argparse.Namespace, quantization: str, kv_dtype: str) -> float:
    """The child's peak RSS, from its second run: the first may compile the library (the compiler's peak)."""
    return min(_rss_once(args, quantization, kv_dtype) for _ in range(2))


def _rss_once(args: argparse.Namespace, quantization: str, kv_dtype: str) -> float:
    cmd = [sys.executable, "-m", "bench.kv_dtype", "--child-rss", "--quantization", quantization]
    cmd += ["--kv-cache-dtype", kv_dtype, *(["--model", str(args.model)] if args.model else [])]
    cmd += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_rss_mb"])


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _prefill_s(rt, tokens: list[int]) -> float:
    rt.add_sequence(1)
    try:
        return _timed(lambda: rt.prefill([1], [tokens]))
    finally:
        rt.remove_sequence(1)


def _decode_ms(rt, sid: int, steps: int) -> float:
    rt.decode([sid], [1])  # warm
    return 1000 * _timed(lambda: [rt.decode([sid], [1]) for _ in range(steps)]) / steps


def speed(args: argparse.Namespace, models: dict) -> dict[str, dict[str, list[float]]]:
    rng = np.random.default_rng(1)
    vocab = next(iter(models.values())).config.vocab_size
    long_prompt = [int(t) for t in rng.integers(0, vocab, args.prefill)]
    ctx_prompt = [int(t) for t in rng.integers(0, vocab, args.context)]
    short_prompt = ctx_prompt[:32]
    for m in models.values():  # sequence 2: long context, 3: short, kept for every round
        rt = m.runtime
        rt.add_sequence(2)
        rt.prefill([2], [ctx_prompt])
        rt.add_sequence(3)
        rt.prefill([3], [short_prompt])
        _prefill_s(rt, long_prompt[:512])  # warm
    out: dict[str, dict[str, list[float]]] = {
        d: {"prefill_s": [], "decode_long_ms": [], "decode_short_ms": []} for d in models
    }
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for d in order:
            rt = models[d].runtime
            out[d]["prefill_s"].append(_prefill_s(rt, long_prompt))
            out[d]["decode_long_ms"].append(_decode_ms(rt, 2, args.steps))
            out[d]["decode_short_ms"].append(_decode_ms(rt, 3, args.steps))
            rt.popn(2, args.steps + 1)
            rt.popn(3, args.steps + 1)
        print(
            f"round {r + 1}: "
            + "  ".join(f"{d} {json.dumps({k: round(v[-1], 4) for k, v in out[d].items()})}" for d in order),
            flush=True,
        )
    return out


def accuracy(models: dict, max_tokens: int) -> dict[str, object]:
    from llama_relax.generation import generate
    from llama_relax.sampling import SamplingParams

    ref_m = models["float32"]
    tok = ref_m.tokenizer
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    rows = []
    for text in PROMPTS:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
        outs, logits = {}, {}
        for d, m in models.items():
            rt = m.runtime
            rt.add_sequence(9)
            try:
                logits[d] = np.asarray(rt.prefill([9], [ids])[0], np.float64)
            finally:
                rt.remove_sequence(9)
            outs[d] = [ev.token_id for ev in generate(rt, ids, params, tok)]
        for d in models:
            if d == "float32":
                continue
            same = next((i for i, (a, b) in enumerate(zip(outs[d], outs["float32"], strict=True)) if a != b), None)
            rows.append(
                {
                    "kv": d,
                    "prompt": text,
                    "max_abs_logit_diff": float(np.max(np.abs(logits[d] - logits["float32"]))),
                    "tokens_equal": same is None,
                    "first_diff": same,
                }
            )
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv_dtype", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefill", type=int, default=8000)
    p.add_argument("--context", type=int, default=4000)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--child-rss", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quantization", default="auto")
    p.add_argument("--kv-cache-dtype", default="float16")
    p.add_argument("--skip", nargs="*", default=[], choices=["rss", "speed", "accuracy"])
    args = p.parse_args(argv)
    if args.child_rss:
        return child_rss(args)

    from llama_relax.bench_model import cpu_description
    from llama_relax.kv_dtype import kv_bytes_per_token

    print(f"CPU: {cpu_description()}", flush=True)
    report: dict[str, object] = {"cpu": cpu_description()}
    if "rss" not in args.skip:
        rss = {
            "none+float32": _rss(args, "none", "float32"),
            "gguf+float32": _rss(args, "auto", "float32"),
            "gguf+float16": _rss(args, "auto", "float16"),
            "gguf+q8_0": _rss(args, "auto", "q8_0"),
        }
        report["peak_rss_mb"] = rss
        print("peak RSS (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
        for k in ("gguf+float16", "gguf+q8_0"):
            print(f"  {k} / none+float32 = {rss[k] / rss['none+float32']:.3f} (target for float16 <= 0.45)")
    models = {d: _open(args, d, total=args.prefill + args.context + 2048) for d in DTYPES}
    cfg = models["float32"].config
    per_token = {d: kv_bytes_per_token(cfg, d) for d in DTYPES}
    report["kv_bytes_per_token"] = per_token
    print(
        "KV bytes/token: "
        + ", ".join(f"{d} {n} ({n / per_token['float32']:.3f}x)" for d, n in per_token.items())
        + " (targets: float16 <= 0.5x, q8_0 <= 0.3x); cache at 8192 tokens: "
        + ", ".join(f"{d} {n * 8192 / 2**20:.0f} MB" for d, n in per_token.items())
    )
    try:
        if "accuracy" not in args.skip:
            acc = accuracy(models, args.max_tokens)
            report["accuracy"] = acc
            for row in acc["rows"]:
                print(
                    f"  {row['kv']}: max |logit diff| {row['max_abs_logit_diff']:.2e}, tokens equal "
                    f"{row['tokens_equal']} ({row['prompt'][:40]!r})"
                )
        if "speed" not in args.skip:
            sp = speed(args, models)
            med = {d: {k: statistics.median(v) for k, v in sp[d].items()} for d in sp}
            report["speed"] = {"rounds": sp, "median": med}
            f32 = med["float32"]
            for d in DTYPES[1:]:
                m = med[d]
                print(
                    f"{d}: prefill {args.prefill} tokens (TTFT) {m['prefill_s']:.2f} s vs float32 {f32['prefill_s']:.2f}"
                    f" s = {m['prefill_s'] / f32['prefill_s']:.3f}x (target <= 1.0); decode b=1 at {args.context} ctx "
                    f"{m['decode_long_ms']:.2f} vs {f32['decode_long_ms']:.2f} ms = "
                    f"{f32['decode_long_ms'] / m['decode_long_ms']:.3f}x faster (target >= 1.2); at 32 ctx "
                    f"{m['decode_short_ms']:.2f} vs {f32['decode_short_ms']:.2f} ms = "
                    f"{f32['decode_short_ms'] / m['decode_short_ms']:.3f}x (target >= 1.0)"
                )
    finally:
        for m in models.values():
            m.close()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
