"""What a speculative step costs on this machine: a `batch_decode` step against a verify forward, by batch size
and draft length, measured once per compiled library and cached beside it (`<library>.spec-cost.json`).

`--speculative auto` (`engine.speculation.choose_drafts`) weighs each draft token's chance of acceptance against
this curve. A verify step is the forward that appends `b * (1 + k)` tokens (hidden states only) plus the LM head
on the rows acceptance reads; a decode step is the fused `batch_decode`. Both are timed side by side at the same
context length, in the worker's own process and thread pool, before it serves.

Call order: `load_or_measure(runtime)` (engine thread, before the first request) -> `StepCost.decode(b)`,
`StepCost.verify(b, tokens, rows)` per step. The file is rewritten when the CPU or the thread count differs."""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llama_relax.runtime import ModelRuntime

log = logging.getLogger(__name__)

DRAFTS = (0, 1, 2, 4, 8, 16)  # draft tokens per sequence the curve samples (0: a step where nobody drafts)
CONTEXT = 128  # tokens each sequence holds while timed
_PROBE_SEQ = 1 << 30  # sequence ids the measurement uses (far from any engine's)
VERSION = 2


@dataclass(frozen=True)
class StepCost:
    """Measured seconds: `decode_s[i]` per `batch_decode` of `batches[i]` sequences; `verify_s[i][j]` per forward
    appending `1 + drafts[j]` tokens to each of them; `head_s[i]` per LM-head call on `batches[i]` rows."""

    cpu: str
    threads: int
    batches: tuple[int, ...]
    drafts: tuple[int, ...]
    decode_s: tuple[float, ...]
    verify_s: tuple[tuple[float, ...], ...]
    head_s: tuple[float, ...]
    version: int = VERSION

    def decode(self, b: int) -> float:
        return _interp(self.batches, self.decode_s, b)

    def verify(self, b: int, tokens: int, rows: float) -> float:
        """A verify step of `b` sequences feeding `tokens` in all, with `rows` logits rows computed (expected)."""
        k = max(0.0, tokens / b - 1)  # draft tokens per sequence, on average
        at = [_interp(self.drafts, row, k) for row in self.verify_s]  # per measured batch size
        head_per_row = _interp(self.batches, self.head_s, b) / b
        return _interp(self.batches, at, b) + rows * head_per_row

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> StepCost:
        d = json.loads(text)
        d["batches"], d["drafts"] = tuple(d["batches"]), tuple(d["drafts"])
        d["decode_s"], d["head_s"] = tuple(d["decode_s"]), tuple(d["head_s"])
        d["verify_s"] = tuple(tuple(r) for r in d["verify_s"])
        return cls(**d)

    def table(self) -> str:
        """Verify/decode ratios, one row per batch size (logs, BENCHMARK.md)."""
        head = "batch  decode ms  " + "  ".join(f"k={k:<3d}" for k in self.drafts)
        lines = [head]
        for b, d, row, h in zip(self.batches, self.decode_s, self.verify_s, self.head_s, strict=True):
            ratios = "  ".join(f"{(v + h) / d:5.2f}" for v in row)
            lines.append(f"{b:5d}  {d * 1e3:9.2f}  {ratios}")
        return "\n".join(lines)


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise linear through (xs, ys), extended linearly past the ends (xs ascending)."""
    if len(xs) == 1:
        return ys[0] * max(x, 1) / xs[0]
    i = min(max(bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)


def _machine() -> tuple[str, int]:
    import tvm

    threads = int(os.environ.get("TVM_NUM_THREADS", "0")) or len(os.sched_getaffinity(0))
    return tvm.target.codegen.llvm_get_system_cpu(), threads


def cost_path(runtime: ModelRuntime) -> Path:
    return runtime.compiled.lib_path.with_suffix(".spec-cost.json")


def load_or_measure(runtime: ModelRuntime, max_batch: int, repeats: int = 3) -> StepCost:
    """The cached curve of this library on this machine, or a new measurement (a few seconds) written beside it."""
    path = cost_path(runtime)
    cpu, threads = _machine()
    try:
        cost = StepCost.from_json(path.read_text())
        if (cost.cpu, cost.threads, cost.version) == (cpu, threads, VERSION) and max(cost.batches) >= min(max_batch, 8):
            return cost
    except (OSError, ValueError, TypeError, KeyError):
        pass
    t0 = time.perf_counter()
    cost = measure(runtime, max_batch, repeats)
    log.info("speculation cost curve measured in %.1f s (%s):\n%s", time.perf_counter() - t0, path.name, cost.table())
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        tmp.write_text(cost.to_json())
        tmp.replace(path)
    except OSError as e:  # a read-only cache still serves; the next start measures again
        log.warning("could not cache the speculation cost curve at %s: %s", path, e)
    return cost


def measure(runtime: ModelRuntime, max_batch: int, repeats: int = 3) -> StepCost:
    """Time decode, verify forwards and LM-head calls on probe sequences (removed after), medians of `repeats`."""
    cpu, threads = _machine()
    ctx = min(CONTEXT, runtime.config.context_window_size // 2)
    chunk = runtime.prefill_chunk_size
    batches = [b for b in (1, 2, 4, 8, 16, 32) if b <= max(1, min(max_batch, runtime.kv_config.max_batch_size))]
    drafts = [k for k in DRAFTS if (1 + k) <= chunk and ctx + 1 + k < runtime.config.context_window_size]
    page = runtime.kv_config.page_size
    free_pages = runtime.free_pages()
    batches = [b for b in batches if b * -(-(ctx + 1 + max(drafts)) // page) <= free_pages] or [1]
    rng = np.random.default_rng(0)
    vocab = runtime.config.vocab_size
    ids = [_PROBE_SEQ + i for i in range(max(batches))]
    for sid in ids:
        runtime.add_sequence(sid)
    try:
        runtime.prefill(ids, [rng.integers(0, vocab, ctx).tolist() for _ in ids])
        decode_s, verify_s, head_s = [], [], []
        for b in batches:
            seqs = ids[:b]
            toks = rng.integers(0, vocab, b).tolist()

            def step(seqs=seqs, toks=toks) -> None:
                runtime.decode(seqs, toks)
                for sid in seqs:
                    runtime.popn(sid, 1)

            decode_s.append(_median(step, repeats))
            row = []
            for k in drafts:
                if b * (1 + k) > chunk:  # past the forward's token budget: extend the curve linearly
                    row.append(row[-1] * (1 + k) / (1 + drafts[len(row) - 1]) if row else float("inf"))
                    continue
                fed = [rng.integers(0, vocab, 1 + k).tolist() for _ in seqs]

                def fwd(seqs=seqs, fed=fed, k=k) -> None:
                    runtime.forward_hidden(seqs, fed)
                    for sid in seqs:
                        runtime.popn(sid, 1 + k)

                row.append(_median(fwd, repeats))
            verify_s.append(tuple(row))
            hidden = runtime.forward_hidden(seqs, [[t] for t in toks])
            head_s.append(
                _median(lambda seqs=seqs, hidden=hidden: runtime.logits_at(hidden, range(len(seqs))), repeats)
            )
            for sid in seqs:
                runtime.popn(sid, 1)
    finally:
        for sid in ids:
            runtime.remove_sequence(sid)
    return StepCost(cpu, threads, tuple(batches), tuple(drafts), tuple(decode_s), tuple(verify_s), tuple(head_s))


def _median(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
