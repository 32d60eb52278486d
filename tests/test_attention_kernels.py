"""The CPU attention kernels in `llama_relax.kernels.attention_cpu` against TVM's stock kernels and NumPy."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.nn.llm import kv_cache as stock

from llama_relax.kernels import attention_cpu as mine
from llama_relax.kernels import cpu_attention_kernels

H_Q, H_KV, PAGE = 4, 2, 16
DTYPE = "float32"
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
THETA, ROPE_SCALE = 10000.0, 1.0
RTOL, ATOL = 1e-5, 1e-5


@functools.cache
def _target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})


def _build(func: tvm.tirx.PrimFunc):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=_target())["main"]


@functools.cache
def _kernel(kind: str, impl: str, d: int):
    """Compiled kernel `kind` of implementation `impl` ("stock" or "mine") for head dim `d` (built once)."""
    if kind == "ragged":
        f = (stock._attention_prefill_ragged_cpu if impl == "stock" else mine.attention_prefill_ragged_cpu)(
            H_KV, H_Q, d, d, DTYPE, LLAMA3
        )
    elif kind == "paged":
        f = (stock._attention_prefill_cpu if impl == "stock" else mine.attention_prefill_cpu)(
            H_KV, H_Q, d, DTYPE, False, LLAMA3
        )
    elif kind == "decode":
        f = (stock._attention_decode_cpu if impl == "stock" else mine.attention_decode_cpu)(
            H_KV, H_Q, d, DTYPE, False, LLAMA3
        )
    elif kind == "merge":
        f = (stock._merge_state_inplace_cpu if impl == "stock" else mine.merge_state_inplace_cpu)(DTYPE)
    else:
        raise ValueError(kind)
    return _build(f)


def _nd(a: np.ndarray):
    return tvm.runtime.tensor(a, tvm.cpu())


# ---------------------------------------------------------------- NumPy reference (float64)


def _inv_freq(d: int) -> np.ndarray:
    i = np.arange(d // 2, dtype=np.float64)
    orig = 1.0 / THETA ** (2 * i / d)
    inv_diff = 1.0 / (LLAMA3["high_freq_factor"] - LLAMA3["low_freq_factor"])
    alpha = LLAMA3["original_max_position_embeddings"] / (2 * math.pi) * inv_diff
    beta = LLAMA3["low_freq_factor"] * inv_diff
    smooth = np.clip(alpha * orig - beta, 0.0, 1.0)
    return (1.0 - smooth) * orig / LLAMA3["factor"] + smooth * orig


def _rope(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of x[n, h, d] at positions pos[n]."""
    d = x.shape[-1]
    ang = (pos.astype(np.float64) * ROPE_SCALE)[:, None] * _inv_freq(d)[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _ref_attention(q, k, v, sm_scale, visible):
    """o[n, h, d], lse[n, h] (log2 units) for q[n, hq, d] vs k/v[m, hkv, d]; visible[n, m] bool."""
    group = q.shape[1] // k.shape[1]
    kk = np.repeat(k, group, axis=1)
    vv = np.repeat(v, group, axis=1)
    s = np.einsum("nhd,mhd->hnm", q, kk) * sm_scale
    s = np.where(visible[None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    den = p.sum(-1, keepdims=True)
    o = np.einsum("hnm,mhd->nhd", p / den, vv)
    lse = (m[..., 0] + np.log(den[..., 0])) / math.log(2)
    return o, lse.T


# ---------------------------------------------------------------- fixtures of inputs


def _paged_layout(rng, kv_lens: list[int], d: int, num_pages: int = 64, make=lambda x: x.astype(DTYPE)):
    """Random pages (`make` turns float64 values into the page format) with the sequences' pages scattered
    (non-contiguous), last pages partial: (pages, page indptr, page values, last page lengths)."""
    pages = make(rng.standard_normal((num_pages, 2, H_KV, PAGE, d)))
    free = list(rng.permutation(num_pages))
    indptr, values, last = [0], [], []
    for n in kv_lens:
        npg = (n + PAGE - 1) // PAGE
        values += [int(free.pop()) for _ in range(npg)]
        indptr.append(len(values))
        last.append(n - (npg - 1) * PAGE if npg else 0)
    return pages, np.array(indptr, "int32"), np.array(values, "int32"), np.array(last, "int32")


def _gather_kv(pages, indptr, values, kv_len: int, b: int):
    ids = values[indptr[b] : indptr[b + 1]]
    k = pages[ids, 0].transpose(0, 2, 1, 3).reshape(-1, H_KV, pages.shape[-1])[:kv_len]
    v = pages[ids, 1].transpose(0, 2, 1, 3).reshape(-1, H_KV, pages.shape[-1])[:kv_len]
    return k.astype(np.float64), v.astype(np.float64)


def _close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- tests


def test_factory_names_and_signatures():
    funcs = cpu_attention_kernels(H_KV, H_Q, 64, DTYPE, LLAMA3)
    assert set(funcs) == {
        "tir_attention_prefill_ragged_cpu",
        "tir_attention_prefill_cpu",
        "tir_attention_decode_cpu",
        "tir_attention_merge_state_cpu",
    }
    refs = {
        "tir_attention_prefill_ragged_cpu": stock._attention_prefill_ragged_cpu(H_KV, H_Q, 64, 64, DTYPE, LLAMA3),
        "tir_attention_prefill_cpu": stock._attention_prefill_cpu(H_KV, H_Q, 64, DTYPE, False, LLAMA3),
        "tir_attention_decode_cpu": stock._attention_decode_cpu(H_KV, H_Q, 64, DTYPE, False, LLAMA3),
        "tir_attention_merge_state_cpu": stock._merge_state_inplace_cpu(DTYPE),
    }
    for name, f in funcs.items():
        assert f.attrs["global_symbol"] == name
        assert _signature(f) == _signature(refs[name]), name


def _signature(f: tvm.tirx.PrimFunc) -> list:
    """Per parameter: (shape, dtype) for buffers, the scalar type otherwise."""
    return [
        (tuple(str(x) for x in p.shape), str(p.dtype)) if isinstance(p.ty, tvm.tirx.buffer.BufferType) else str(p.ty)
        for p in f.params
    ]


@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("rotary", [0, 1])
@pytest.mark.parametrize("causal", [1, 0])
def test_ragged_prefill(d, rotary, causal):
    rng = np.random.default_rng(d * 10 + rotary * 2 + causal)
    lens = [37, 1, 16, 70, 5]
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype("int32")
    n = int(indptr[-1])
    q = rng.standard_normal((n, H_Q, d)).astype(DTYPE)
    k = rng.standard_normal((n, H_KV, d)).astype(DTYPE)
    v = rng.standard_normal((n, H_KV, d)).astype(DTYPE)
    k_off = np.array([3, 0, 40, 7, 100], "int32")  # tokens already in the cache before this chunk
    q_pos = np.concatenate([np.arange(ln) + off for ln, off in zip(lens, k_off, strict=True)]).astype("int32")
    sm_scale = 1.0 / math.sqrt(d)
    outs = {}
    for impl in ("stock", "mine"):
        o, lse = _nd(np.zeros((n, H_Q, d), DTYPE)), _nd(np.zeros((n, H_Q), "float32"))
        _kernel("ragged", impl, d)(
            _nd(q),
            _nd(indptr),
            _nd(k),
            _nd(v),
            _nd(indptr),
            _nd(q_pos),
            _nd(k_off),
            o,
            lse,
            causal,
            rotary,
            ROPE_SCALE,
            THETA,
            sm_scale,
        )
        outs[impl] = (o.numpy(), lse.numpy())
    _close(outs["mine"][0], outs["stock"][0])
    _close(outs["mine"][1], outs["stock"][1])
    for b, ln in enumerate(lens):
        sl = slice(indptr[b], indptr[b + 1])
        qb, kb = q[sl].astype(np.float64), k[sl].astype(np.float64)
        if rotary:
            qb, kb = _rope(qb, q_pos[sl]), _rope(kb, k_off[b] + np.arange(ln))
        visible = np.tril(np.ones((ln, ln), bool)) if causal else np.ones((ln, ln), bool)
        o_ref, lse_ref = _ref_attention(qb, kb, v[sl].astype(np.float64), sm_scale, visible)
        _close(outs["mine"][0][sl], o_ref, rtol=1e-4, atol=1e-4)
        _close(outs["mine"][1][sl], lse_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("rotary", [0, 1])
def test_decode(d, rotary):
    rng = np.random.default_rng(100 + d + rotary)
    kv_lens = [1, 16, 17, 200, 0, 45]  # one sequence with no page at this depth
    pages, indptr, values, last = _paged_layout(rng, kv_lens, d)
    bsz = len(kv_lens)
    q = rng.standard_normal((bsz, H_Q, d)).astype(DTYPE)
    k_off = np.array([0, 5, 0, 2, 0, 9], "int32")
    q_pos = np.array([ln - 1 + off for ln, off in zip(kv_lens, k_off, strict=True)], "int32")
    sm_scale = 1.0 / math.sqrt(d)
    outs = {}
    for impl in ("stock", "mine"):
        o, lse = _nd(np.zeros((bsz, H_Q, d), DTYPE)), _nd(np.zeros((bsz, H_Q), "float32"))
        _kernel("decode", impl, d)(
            _nd(q),
            _nd(pages),
            _nd(indptr),
            _nd(values),
            _nd(last),
            _nd(k_off),
            _nd(q_pos),
            o,
            lse,
            rotary,
            ROPE_SCALE,
            THETA,
            sm_scale,
        )
        outs[impl] = (o.numpy(), lse.numpy())
    _close(outs["mine"][0], outs["stock"][0])
    _close(outs["mine"][1], outs["stock"][1])
    for b, ln in enumerate(kv_lens):
        if ln == 0:  # empty: o = 0, lse = -5e4 (ignored by the merge)
            assert np.all(outs["mine"][0][b] == 0)
            np.testing.assert_allclose(outs["mine"][1][b], -5e4)
            continue
        kb, vb = _gather_kv(pages, indptr, values, ln, b)
        qb = q[b : b + 1].astype(np.float64)
        if rotary:
            qb, kb = _rope(qb, q_pos[b : b + 1]), _rope(kb, k_off[b] + np.arange(ln))
        o_ref, lse_ref = _ref_attention(qb, kb, vb, sm_scale, np.ones((1, ln), bool))
        _close(outs["mine"][0][b], o_ref[0], rtol=1e-4, atol=1e-4)
        _close(outs["mine"][1][b], lse_ref[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("rotary", [0, 1])
@pytest.mark.parametrize("causal", [0, 1])
def test_paged_prefill(d, rotary, causal):
    rng = np.random.default_rng(200 + d + rotary * 2 + causal)
    q_lens = [9, 1, 40, 3]
    kv_lens = [30, 16, 75, 0]  # causal=1 needs kv_len >= q_len; the last sequence has no pages
    if causal:
        kv_lens[-1] = 5
    pages, indptr, values, last = _paged_layout(rng, kv_lens, d)
    q_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype("int32")
    n = int(q_indptr[-1])
    q = rng.standard_normal((n, H_Q, d)).astype(DTYPE)
    k_off = np.array([0, 4, 11, 0], "int32")
    q_pos = np.concatenate(
        [np.arange(ql) + kl - ql + off for ql, kl, off in zip(q_lens, kv_lens, k_off, strict=True)]
    ).astype("int32")
    sm_scale = 1.0 / math.sqrt(d)
    outs = {}
    for impl in ("stock", "mine"):
        o, lse = _nd(np.zeros((n, H_Q, d), DTYPE)), _nd(np.zeros((n, H_Q), "float32"))
        _kernel("paged", impl, d)(
            _nd(q),
            _nd(q_indptr),
            _nd(pages),
            _nd(indptr),
            _nd(values),
            _nd(last),
            _nd(k_off),
            _nd(q_pos),
            o,
            lse,
            causal,
            rotary,
            ROPE_SCALE,
            THETA,
            sm_scale,
        )
        outs[impl] = (o.numpy(), lse.numpy())
    _close(outs["mine"][0], outs["stock"][0])
    _close(outs["mine"][1], outs["stock"][1])
    o, lse = outs["mine"]
    for b, (ql, kl) in enumerate(zip(q_lens, kv_lens, strict=True)):
        sl = slice(q_indptr[b], q_indptr[b + 1])
        if kl == 0:
            assert np.all(o[sl] == 0)
            np.testing.assert_allclose(lse[sl], -5e4)
            continue
        kb, vb = _gather_kv(pages, indptr, values, kl, b)
        qb = q[sl].astype(np.float64)
        if rotary:
            qb, kb = _rope(qb, q_pos[sl]), _rope(kb, k_off[b] + np.arange(kl))
        visible = np.ones((ql, kl), bool)
        if causal:
            visible = np.arange(kl)[None, :] < (kl - ql + np.arange(ql) + 1)[:, None]
        o_ref, lse_ref = _ref_attention(qb, kb, vb, sm_scale, visible)
        _close(o[sl], o_ref, rtol=1e-4, atol=1e-4)
        _close(lse[sl], lse_ref, rtol=1e-4, atol=1e-4)


def test_merge_state():
    rng = np.random.default_rng(7)
    n, h, d = 37, H_Q, 64
    v0 = rng.standard_normal((n, h, d)).astype(DTYPE)
    v1 = rng.standard_normal((n, h, d)).astype(DTYPE)
    s0 = (rng.standard_normal((n, h)) * 4).astype("float32")
    s1 = (rng.standard_normal((n, h)) * 4).astype("float32")
    s1[0] = -5e4  # an empty partial state
    outs = {}
    for impl in ("stock", "mine"):
        v, s = _nd(v0.copy()), _nd(s0.copy())
        _kernel("merge", impl, 0)(v, s, _nd(v1), _nd(s1))
        outs[impl] = (v.numpy(), s.numpy())
    _close(outs["mine"][0], outs["stock"][0])
    _close(outs["mine"][1], outs["stock"][1])
    np.testing.assert_allclose(outs["mine"][0][0], v0[0], rtol=1e-6)


def test_smollm_shapes_match_stock():
    """9 q heads / 3 kv heads / head_dim 64 (group of 3: the odd row-block path), the model's rope mode."""
    hq, hkv, d = 9, 3, 64
    rng = np.random.default_rng(11)
    lens = [50, 83]
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype("int32")
    n = int(indptr[-1])
    q = rng.standard_normal((n, hq, d)).astype(DTYPE)
    k = rng.standard_normal((n, hkv, d)).astype(DTYPE)
    v = rng.standard_normal((n, hkv, d)).astype(DTYPE)
    pos = np.concatenate([np.arange(ln) for ln in lens]).astype("int32")
    zeros_b = np.zeros(len(lens), "int32")
    num_pages = 20
    pages = rng.standard_normal((num_pages, 2, hkv, PAGE, d)).astype(DTYPE)
    pg_indptr = np.array([0, 4, 10], "int32")
    pg_values = rng.permutation(num_pages)[:10].astype("int32")
    last = np.array([3, 16], "int32")
    cases = {
        "ragged": (
            lambda impl: (
                stock._attention_prefill_ragged_cpu if impl == "stock" else mine.attention_prefill_ragged_cpu
            )(hkv, hq, d, d, DTYPE, {}),
            [q, indptr, k, v, indptr, pos, zeros_b],
            (n, hq),
            [1, 0, 1.0, THETA, 0.125],
        ),
        "paged": (
            lambda impl: (stock._attention_prefill_cpu if impl == "stock" else mine.attention_prefill_cpu)(
                hkv, hq, d, DTYPE, False, {}
            ),
            [q, indptr, pages, pg_indptr, pg_values, last, zeros_b, pos],
            (n, hq),
            [0, 0, 1.0, THETA, 0.125],
        ),
        "decode": (
            lambda impl: (stock._attention_decode_cpu if impl == "stock" else mine.attention_decode_cpu)(
                hkv, hq, d, DTYPE, False, {}
            ),
            [q[:2], pages, pg_indptr, pg_values, last, zeros_b, zeros_b],
            (2, hq),
            [0, 1.0, THETA, 0.125],
        ),
    }
    for kind, (make, inputs, (rows, heads), scalars) in cases.items():
        outs = []
        for impl in ("stock", "mine"):
            o, lse = _nd(np.zeros((rows, heads, d), DTYPE)), _nd(np.zeros((rows, heads), "float32"))
            _build(make(impl))(*[_nd(x) for x in inputs], o, lse, *scalars)
            outs.append((o.numpy(), lse.numpy()))
        _close(outs[1][0], outs[0][0])
        _close(outs[1][1], outs[0][1])
        assert kind and np.isfinite(outs[1][0]).all()
