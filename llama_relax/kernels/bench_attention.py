"""Stock vs `attention_cpu` kernel times for SmolLM2-135M shapes (9 q heads, 3 kv heads, head_dim 64, fp32).

Run as `python -m llama_relax.kernels.bench_attention [--quick]`. Times are per call (one layer).
TVM's CPU thread pool defaults to half the logical cores on x86 (1 thread on a 2-vCPU box): set
TVM_NUM_THREADS to the core count before TVM starts, which this script's `main` does if it is unset.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

import numpy as np
import tvm
from tvm.relax.frontend.nn.llm import kv_cache as stock

from llama_relax.kernels import attention_cpu as mine
from llama_relax.process import use_all_cores

H_Q, H_KV, D, PAGE = 9, 3, 64, 16
DTYPE = "float32"


def _build(func: tvm.tirx.PrimFunc):
    target = tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}
    )
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]


def _nd(a: np.ndarray):
    return tvm.runtime.tensor(a, tvm.cpu())


def _time(fn: Callable[[], None], min_s: float = 0.5, max_reps: int = 50) -> float:
    """Median seconds per call (one warm-up call first)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_s or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if times[-1] > 5.0:  # very slow stock kernel: one measured run is enough
            break
    return float(np.median(times))


def _ragged_args(n: int) -> list:
    rng = np.random.default_rng(0)
    indptr = np.array([0, n], "int32")
    return [
        _nd(rng.standard_normal((n, H_Q, D)).astype(DTYPE)),
        _nd(indptr),
        _nd(rng.standard_normal((n, H_KV, D)).astype(DTYPE)),
        _nd(rng.standard_normal((n, H_KV, D)).astype(DTYPE)),
        _nd(indptr),
        _nd(np.arange(n, dtype="int32")),
        _nd(np.zeros(1, "int32")),
        _nd(np.zeros((n, H_Q, D), DTYPE)),
        _nd(np.zeros((n, H_Q), "float32")),
        1,  # causal
        0,  # rotary_mode (RopeMode.NORMAL -> 0)
        1.0,
        10000.0,
        1.0 / math.sqrt(D),
    ]


def _paged(rng, batch: int, ctx: int):
    pages_per_seq = (ctx + PAGE - 1) // PAGE
    num_pages = batch * pages_per_seq
    pages = rng.standard_normal((num_pages, 2, H_KV, PAGE, D)).astype(DTYPE)
    values = rng.permutation(num_pages).astype("int32")
    indptr = (np.arange(batch + 1) * pages_per_seq).astype("int32")
    last = np.full(batch, ctx - (pages_per_seq - 1) * PAGE, "int32")
    return pages, indptr, values, last


def _decode_args(batch: int, ctx: int) -> list:
    rng = np.random.default_rng(1)
    pages, indptr, values, last = _paged(rng, batch, ctx)
    return [
        _nd(rng.standard_normal((batch, H_Q, D)).astype(DTYPE)),
        _nd(pages),
        _nd(indptr),
        _nd(values),
        _nd(last),
        _nd(np.zeros(batch, "int32")),
        _nd(np.full(batch, ctx - 1, "int32")),
        _nd(np.zeros((batch, H_Q, D), DTYPE)),
        _nd(np.zeros((batch, H_Q), "float32")),
        0,
        1.0,
        10000.0,
        1.0 / math.sqrt(D),
    ]


def _paged_prefill_args(n: int, ctx: int) -> list:
    rng = np.random.default_rng(2)
    pages, indptr, values, last = _paged(rng, 1, ctx)
    return [
        _nd(rng.standard_normal((n, H_Q, D)).astype(DTYPE)),
        _nd(np.array([0, n], "int32")),
        _nd(pages),
        _nd(indptr),
        _nd(values),
        _nd(last),
        _nd(np.zeros(1, "int32")),
        _nd(np.arange(ctx, ctx + n, dtype="int32")),
        _nd(np.zeros((n, H_Q, D), DTYPE)),
        _nd(np.zeros((n, H_Q), "float32")),
        0,  # causal: the C++ passes 0 for non-sliding layers (the chunk's own tokens go to the ragged kernel)
        0,
        1.0,
        10000.0,
        1.0 / math.sqrt(D),
    ]


def main() -> None:
    use_all_cores()  # this script's entry point: before TVM's pool starts
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the slow stock runs of the big cases")
    args = parser.parse_args()
    rope: dict = {}
    kernels = {
        "ragged": (
            stock._attention_prefill_ragged_cpu(H_KV, H_Q, D, D, DTYPE, rope),
            mine.attention_prefill_ragged_cpu(H_KV, H_Q, D, D, DTYPE, rope),
        ),
        "paged": (
            stock._attention_prefill_cpu(H_KV, H_Q, D, DTYPE, False, rope),
            mine.attention_prefill_cpu(H_KV, H_Q, D, DTYPE, False, rope),
        ),
        "decode": (
            stock._attention_decode_cpu(H_KV, H_Q, D, DTYPE, False, rope),
            mine.attention_decode_cpu(H_KV, H_Q, D, DTYPE, False, rope),
        ),
    }
    built = {k: (_build(s), _build(m)) for k, (s, m) in kernels.items()}
    cases = [
        ("ragged prefill, 512 tokens", "ragged", _ragged_args(512), False),
        ("ragged prefill, 2048 tokens", "ragged", _ragged_args(2048), True),
        ("paged prefill, 512 q vs 512 cached", "paged", _paged_prefill_args(512, 512), True),
        ("decode, batch 1, ctx 512", "decode", _decode_args(1, 512), False),
        ("decode, batch 16, ctx 512", "decode", _decode_args(16, 512), False),
        ("decode, batch 16, ctx 1024", "decode", _decode_args(16, 1024), False),
    ]
    print(f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}; per-layer times (x30 layers for SmolLM2-135M)")
    print(f"{'case':40s} {'stock ms':>10s} {'ours ms':>10s} {'speedup':>8s}")
    for label, kind, call_args, slow in cases:
        f_stock, f_mine = built[kind]
        t_mine = _time(lambda f=f_mine, a=call_args: f(*a))
        if slow and args.quick:
            print(f"{label:40s} {'-':>10s} {t_mine * 1e3:10.3f}")
            continue
        t_stock = _time(lambda f=f_stock, a=call_args: f(*a), min_s=0.2, max_reps=5)
        print(f"{label:40s} {t_stock * 1e3:10.3f} {t_mine * 1e3:10.3f} {t_stock / t_mine:7.1f}x")


if __name__ == "__main__":
    main()
