"""Benchmark the CPU matmul schedules against NumPy on the SmolLM2-135M shapes.

    python -m llama_relax.bench_matmul [--quick]

Each kernel is produced exactly as in the model pipeline (nn.Module -> legalize passes -> `cpu_schedule_pass`),
then compiled standalone and timed with `perf_counter` loops (best of several). "hot" runs reuse one weight (it stays in L2/L3);
"cold" runs rotate over enough weight copies to exceed the last-level cache, as a real decode step does.
TVM and NumPy are timed in separate phases so their thread pools do not spin against each other.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from llama_relax.process import use_all_cores
from llama_relax.schedule_cpu import cpu_schedule_pass

COLD_BYTES = 96 << 20  # > 16 MiB L3


@dataclass(frozen=True)
class Shape:
    """One matmul: name, K, N, NT (weight stored [N, K]) or NN ([K, N])."""

    name: str
    k: int
    n: int
    nt: bool = False


SHAPES = [
    Shape("qkv", 576, 960),
    Shape("o", 576, 576),
    Shape("gate_up", 576, 3072),
    Shape("down", 1536, 576),
    Shape("lm_head", 576, 49152, nt=True),
]


def default_target() -> tvm.target.Target:
    """The host CPU with its real ISA (a plain "llvm" target would fall back to generic x86)."""
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": len(os.sched_getaffinity(0))})


def build_kernel(shape: Shape, target: tvm.target.Target, dtype: str = "float32") -> tvm.runtime.Module:
    """Export a one-matmul nn.Module, run legalize + the schedule pass, compile the matmul PrimFunc."""

    class One(nn.Module):
        def __init__(self) -> None:
            self.w = nn.Parameter((shape.n, shape.k) if shape.nt else (shape.k, shape.n), dtype)

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            return op.matmul(x, op.permute_dims(self.w) if shape.nt else self.w)

    mod, _ = One().export_tvm(spec={"forward": {"x": nn.spec.Tensor([1, "m", shape.k], dtype)}})
    with target:
        mod = tvm.transform.Sequential([*cpu_pipeline.legalize_passes(target), cpu_schedule_pass(target)])(mod)
    funcs = [
        f
        for _, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "tirx.is_scheduled" in f.attrs
    ]
    # the NT rewrite leaves the unused NN matmul behind; pick the one whose weight layout matches
    funcs = [
        f
        for f in funcs
        if [int(d) for d in f.params[1].shape] == ([shape.n, shape.k] if shape.nt else [shape.k, shape.n])
    ]
    if not funcs:
        raise RuntimeError(f"{shape.name}: the schedule pass did not schedule the matmul")
    prim = funcs[0].with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": prim}), target=target)


def _weights(shape: Shape, copies: int, rng: np.random.Generator) -> list[np.ndarray]:
    dims = (shape.n, shape.k) if shape.nt else (shape.k, shape.n)
    return [rng.standard_normal(dims, dtype=np.float32) for _ in range(copies)]


def time_tvm(lib, m: int, shape: Shape, weights: list[np.ndarray], repeat: int) -> tuple[float, float]:
    """(hot, cold) seconds per call; also checks the result against NumPy."""
    dev = tvm.cpu()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, m, shape.k), dtype=np.float32)
    tx = tvm.runtime.tensor(x, dev)
    tws = [tvm.runtime.tensor(w, dev) for w in weights]
    out = tvm.runtime.tensor(np.zeros((1, m, shape.n), np.float32), dev)
    fn = lib["main"]
    fn(tx, tws[0], out)
    flops = 2 * m * shape.k * shape.n
    number = max(1, min(200, int(2e8 / flops)))
    hot = cold = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(tx, tws[0], out)
        hot = min(hot, (time.perf_counter() - t0) / number)
        if len(tws) > 1:
            t0 = time.perf_counter()
            for tw in tws:
                fn(tx, tw, out)
            cold = min(cold, (time.perf_counter() - t0) / len(tws))
    fn(tx, tws[0], out)  # checked after timing: NumPy's BLAS threads would spin against ours
    np.testing.assert_allclose(out.numpy(), x @ (weights[0].T if shape.nt else weights[0]), rtol=2e-3, atol=2e-3)
    return hot, cold


def time_numpy(m: int, shape: Shape, weights: list[np.ndarray], repeat: int) -> tuple[float, float]:
    """(hot, cold) seconds per NumPy matmul on the same operands."""
    x = np.random.default_rng(1).standard_normal((m, shape.k), dtype=np.float32)
    ws = [w.T if shape.nt else w for w in weights]
    flops = 2 * m * shape.k * shape.n
    number = max(1, min(200, int(2e8 / flops)))
    x @ ws[0]
    hot = cold = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            x @ ws[0]
        hot = min(hot, (time.perf_counter() - t0) / number)
        if len(ws) > 1:
            t0 = time.perf_counter()
            for w in ws:
                x @ w
            cold = min(cold, (time.perf_counter() - t0) / len(ws))
    return hot, cold


def main(argv: list[str] | None = None) -> None:
    """Print ours-vs-NumPy GFLOP/s (prefill) and GB/s of weight streamed (decode), side by side."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip the cold runs")
    parser.add_argument("--prefill-m", type=int, default=512)
    parser.add_argument("--decode-m", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args(argv)
    repeat, rounds = (2, 1) if args.quick else (3, 3)
    use_all_cores()  # this script's entry point: before the first parallel kernel starts TVM's pool
    target = default_target()
    print(f"target: {target}  TVM threads {os.environ['TVM_NUM_THREADS']}  numpy {np.__version__}")
    rng = np.random.default_rng(0)
    plan = []
    for shape in SHAPES:
        wbytes = shape.k * shape.n * 4
        copies = 1 if args.quick else max(2, -(-COLD_BYTES // wbytes))
        ms = [args.prefill_m if not shape.nt else 64, *args.decode_m]
        plan.append((shape, ms, _weights(shape, copies, rng), build_kernel(shape, target)))
    # Rounds alternate TVM and NumPy per shape (best time of each side kept), with pauses in between: both
    # thread pools spin-wait after a call and would steal each other's cores, and this VM's speed drifts.
    ours_all: list[dict] = [{} for _ in plan]
    ref_all: list[dict] = [{} for _ in plan]
    for _ in range(rounds):
        for i, (shape, ms, weights, lib) in enumerate(plan):
            for m in ms:
                got = time_tvm(lib, m, shape, weights, repeat)
                ours_all[i][m] = tuple(map(min, zip(ours_all[i].get(m, got), got, strict=True)))
            time.sleep(0.3)
            for m in ms:
                got = time_numpy(m, shape, weights, repeat)
                ref_all[i][m] = tuple(map(min, zip(ref_all[i].get(m, got), got, strict=True)))
            time.sleep(0.3)
    rows = [(shape, ms, ours, ref) for (shape, ms, _, _), ours, ref in zip(plan, ours_all, ref_all, strict=True)]

    print("\nPrefill-sized (hot weights), GFLOP/s:")
    print(f"{'shape':>8} {'M':>4} {'K':>5} {'N':>6} {'ours':>8} {'numpy':>8} {'ratio':>6}")
    for shape, ms, ours, ref in rows:
        m = ms[0]
        g = 2 * m * shape.k * shape.n / 1e9
        print(
            f"{shape.name:>8} {m:>4} {shape.k:>5} {shape.n:>6} {g / ours[m][0]:8.1f} {g / ref[m][0]:8.1f} {ref[m][0] / ours[m][0]:6.2f}"
        )

    print("\nDecode: GB/s of weights streamed (hot: one cached weight; cold: rotating copies > L3);")
    print("x rows/s: this M's rows per second over M=1's, hot and cold")
    head = f"{'shape':>8} {'M':>4} {'ours hot':>9} {'np hot':>8} {'ours cold':>10} {'np cold':>8} {'ms cold':>8}"
    print(f"{head} {'x hot':>6} {'x cold':>7}")
    for shape, ms, ours, ref in rows:
        wgb = shape.k * shape.n * 4 / 1e9
        base_hot, base_cold = ours[ms[1]]
        for m in ms[1:]:
            (oh, oc), (nh, nc) = ours[m], ref[m]
            x_hot = (m / oh) / (ms[1] / base_hot)
            x_cold = (m / oc) / (ms[1] / base_cold) if np.isfinite(oc) else float("nan")
            print(
                f"{shape.name:>8} {m:>4} {wgb / oh:9.1f} {wgb / nh:8.1f} {wgb / oc:10.1f} {wgb / nc:8.1f} "
                f"{oc * 1e3:8.3f} {x_hot:6.2f} {x_cold:7.2f}"
            )


if __name__ == "__main__":
    main()
