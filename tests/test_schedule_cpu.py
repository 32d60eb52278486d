"""Tests for `llama_relax.schedule_cpu`: the CPU matmul schedules and the transpose+matmul (LM head) fusion."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.script import tirx as T

from llama_relax.schedule_cpu import cpu_schedule_pass, schedule_prim_func

# Small stand-ins for the model's shapes; several are not multiples of the 6 x 16 tile.
HID, INTER, QKV, VOCAB = 64, 72, 200, 130


def _target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})


class _Block(nn.Module):
    """The op patterns of a Llama layer + LM head: qkv, fused SwiGLU input, residual adds, NT LM head."""

    def __init__(self) -> None:
        self.norm = nn.Parameter((HID,), "float32")
        self.qkv = nn.Parameter((HID, QKV), "float32")
        self.o = nn.Parameter((QKV, HID), "float32")
        self.gate_up = nn.Parameter((HID, 2 * INTER), "float32")
        self.down = nn.Parameter((INTER, HID), "float32")
        self.embed = nn.Parameter((VOCAB, HID), "float32")

    def _body(self, x: nn.Tensor) -> tuple[nn.Tensor, nn.Tensor]:
        h = op.rms_norm(x, self.norm, axes=[-1])
        x = x + op.matmul(op.matmul(h, self.qkv), self.o)
        g, u = op.split(op.matmul(x, self.gate_up), 2, axis=-1)
        x = x + op.matmul(op.silu(g) * u, self.down)
        return x, op.matmul(x, op.permute_dims(self.embed))

    def prefill(self, x: nn.Tensor) -> tuple[nn.Tensor, nn.Tensor]:
        return self._body(x)

    def decode(self, x: nn.Tensor) -> tuple[nn.Tensor, nn.Tensor]:
        return self._body(x)

    def embed_tokens(self, ids: nn.Tensor) -> nn.Tensor:
        return op.take(self.embed, ids, axis=0)


def _reference(x: np.ndarray, p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * p["norm"]
    x = x + (h @ p["qkv"]) @ p["o"]
    gu = x @ p["gate_up"]
    g, u = gu[..., :INTER], gu[..., INTER:]
    x = x + (g / (1 + np.exp(-g)) * u) @ p["down"]
    return x, x @ p["embed"].T


@pytest.fixture(scope="module")
def compiled():
    """Export, legalize + schedule (kept for inspection), build; returns (scheduled mod, vm, params)."""
    target = _target()
    spec = {
        "prefill": {"x": nn.spec.Tensor([1, "seq_len", HID], "float32")},
        "decode": {"x": nn.spec.Tensor(["batch_size", 1, HID], "float32")},
        "embed_tokens": {"ids": nn.spec.Tensor(["n"], "int32")},
    }
    mod, named = _Block().export_tvm(spec=spec)
    schedule = cpu_schedule_pass(target)
    with target:
        scheduled = tvm.transform.Sequential([*cpu_pipeline.legalize_passes(target), schedule])(mod)

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(m: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        with target:
            passes = [
                *cpu_pipeline.library_dispatch_passes(target),
                *cpu_pipeline.legalize_passes(target),
                schedule,
                *cpu_pipeline.dataflow_lower_passes(target),
                *cpu_pipeline.finalize_passes(target),
            ]
            return tvm.transform.Sequential(passes)(m)

    vm = relax.VirtualMachine(relax.build(mod, target, relax_pipeline=pipeline), tvm.cpu())
    rng = np.random.default_rng(0)
    params = {name: (rng.standard_normal([int(d) for d in p.shape]) * 0.2).astype(np.float32) for name, p in named}
    return scheduled, vm, params


def _matmul_funcs(mod: tvm.ir.IRModule) -> dict[str, tvm.tirx.PrimFunc]:
    return {
        gv.name_hint: f
        for gv, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint
    }


def test_every_matmul_is_scheduled(compiled) -> None:
    scheduled, _, _ = compiled
    funcs = _matmul_funcs(scheduled)
    called = set()
    for _, f in scheduled.functions_items():
        if isinstance(f, relax.Function):
            called |= {gv.name_hint for gv in relax.analysis.all_global_vars(f)}
    used = {name: f for name, f in funcs.items() if name in called}
    # qkv, o (+add), gate_up, down (+add), NT lm head; for both prefill and decode
    assert len(used) >= 5, sorted(used)
    for name, f in used.items():
        assert f.attrs is not None and f.attrs.get("tirx.is_scheduled"), name
        text = f.script()
        assert "T.parallel(" in text and "T.vectorized(" in text, name
    assert any(name.endswith("_nt") for name in used), "LM head was not fused into an NT matmul"
    assert not any("transpose" in name for name in called), "the embedding is still transposed at run time"


@pytest.mark.parametrize("m", [1, 3, 17, 64, 130])
def test_prefill_matches_numpy(compiled, m: int) -> None:
    _, vm, params = compiled
    x = np.random.default_rng(m).standard_normal((1, m, HID)).astype(np.float32)
    args = [tvm.runtime.tensor(v) for v in params.values()]
    hidden, logits = vm["prefill"](tvm.runtime.tensor(x), *args)
    ref_hidden, ref_logits = _reference(x, params)
    np.testing.assert_allclose(hidden.numpy(), ref_hidden, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits.numpy(), ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_decode_matches_numpy(compiled, batch: int) -> None:
    _, vm, params = compiled
    x = np.random.default_rng(100 + batch).standard_normal((batch, 1, HID)).astype(np.float32)
    args = [tvm.runtime.tensor(v) for v in params.values()]
    hidden, logits = vm["decode"](tvm.runtime.tensor(x), *args)
    ref_hidden, ref_logits = _reference(x, params)
    np.testing.assert_allclose(hidden.numpy(), ref_hidden, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits.numpy(), ref_logits, rtol=1e-4, atol=1e-4)


def test_elementwise_scheduled_data_movement_untouched(compiled) -> None:
    scheduled, _, _ = compiled
    prims = {gv.name_hint: f for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    silu = [f for name, f in prims.items() if "silu" in name]
    assert silu and all(f.attrs.get("tirx.is_scheduled") for f in silu)
    # reshape / take stay as legalized (RewriteDataflowReshape must still recognise reshapes)
    for name, f in prims.items():
        if name.startswith(("reshape", "take", "rms_norm")):
            assert "tirx.is_scheduled" not in f.attrs, name


def test_take_untouched_and_correct(compiled) -> None:
    _, vm, params = compiled
    ids = np.array([3, 0, VOCAB - 1], dtype=np.int32)
    out = vm["embed_tokens"](tvm.runtime.tensor(ids), *[tvm.runtime.tensor(v) for v in params.values()])
    np.testing.assert_array_equal(out.numpy(), params["embed"][ids])


@T.prim_func(private=True, s_tir=True)
def _blockless(a: T.Buffer((16,), "float32"), b: T.Buffer((16,), "float32")):
    for i in range(16):
        b[i] = a[i] * T.float32(2)


@T.prim_func(private=True, s_tir=True)
def _already_scheduled(a: T.Buffer((8, 8), "float32"), w: T.Buffer((8, 8), "float32"), c: T.Buffer((8, 8), "float32")):
    T.func_attr({"tirx.is_scheduled": True})
    for i, j, k in T.grid(8, 8, 8):
        with T.sblock("matmul"):
            vi, vj, vk = T.axis.remap("SSR", [i, j, k])
            with T.init():
                c[vi, vj] = T.float32(0)
            c[vi, vj] = c[vi, vj] + a[vi, vk] * w[vk, vj]


def test_unrecognised_functions_are_left_alone() -> None:
    assert schedule_prim_func(_blockless) is None
    mod = tvm.IRModule({"blockless": _blockless, "done": _already_scheduled})
    out = cpu_schedule_pass(_target())(mod)
    assert out["blockless"].same_as(mod["blockless"])
    assert out["done"].same_as(mod["done"])


def _dequant_q4(q: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """float64 [K, N] of a Q4 weight (`llama_relax.quantization`'s layout), written out independently."""
    k = q.shape[0] * 2
    w = np.empty((k, q.shape[1]), np.float64)
    for g in range(k // 32):
        b = q[16 * g : 16 * g + 16].astype(np.int64)
        w[32 * g : 32 * g + 16] = b & 15
        w[32 * g + 16 : 32 * g + 32] = b >> 4
        w[32 * g : 32 * g + 32] = w[32 * g : 32 * g + 32] * s[g] + z[g]
    return w


@pytest.fixture(scope="module")
def q4_matmul():
    from llama_relax.quantization import QuantizedWeight, WeightFormat

    k, n = 128, 96

    class One(nn.Module):
        def __init__(self) -> None:
            self.w = QuantizedWeight(n, k, WeightFormat.Q4, "float32", "float32")

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            return self.w.matmul(x)

    target = _target()
    mod, _ = One().export_tvm(spec={"forward": {"x": nn.spec.Tensor([1, "m", k], "float32")}})
    with target:
        mod = tvm.transform.Sequential([*cpu_pipeline.legalize_passes(target), cpu_schedule_pass(target)])(mod)
    prims = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "tirx.is_scheduled" in f.attrs]
    assert len(prims) == 1, "the dequantized matmul was not scheduled"
    return tvm.compile(tvm.IRModule({"main": prims[0].with_attr("global_symbol", "main")}), target=target), k, n


@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 10, 11, 16, 17])
def test_quantized_matmul_matches_numpy_across_the_small_m_crossover(q4_matmul, m: int) -> None:
    """The small-M kernel (one dequantized tile for all rows) and the GEMM, on both sides of `qgemv_max_m`."""
    lib, k, n = q4_matmul
    rng = np.random.default_rng(m)
    q = rng.integers(0, 256, (k // 2, n), dtype=np.uint8)
    s = rng.random((k // 32, n), dtype=np.float32) * 0.1
    z = -rng.random((k // 32, n), dtype=np.float32) * 0.1
    x = rng.standard_normal((1, m, k), dtype=np.float32)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((1, m, n), np.float32), dev)
    lib["main"](*(tvm.runtime.tensor(a, dev) for a in (x, q, s, z)), out)
    np.testing.assert_allclose(out.numpy()[0], x[0].astype(np.float64) @ _dequant_q4(q, s, z), rtol=1e-4, atol=1e-4)
