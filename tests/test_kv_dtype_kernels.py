"""The CPU attention kernels on float16 KV (q, k, v, pages and output in float16, float32 inside) against the
float64 reference given the same float16-rounded inputs: what remains is the kernels' own float32 arithmetic and
the float16 rounding of the output."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from test_attention_kernels import (
    H_KV,
    H_Q,
    LLAMA3,
    ROPE_SCALE,
    THETA,
    _build,
    _gather_kv,
    _nd,
    _paged_layout,
    _ref_attention,
    _rope,
)

from llama_relax.kernels import attention_cpu as mine

F16 = "float16"
TOL = {"rtol": 2e-3, "atol": 2e-3}  # the output is rounded to float16 (2^-11 relative)


@functools.cache
def _kernel(kind: str, d: int):
    if kind == "ragged":
        return _build(mine.attention_prefill_ragged_cpu(H_KV, H_Q, d, d, F16, LLAMA3))
    if kind == "paged":
        return _build(mine.attention_prefill_cpu(H_KV, H_Q, d, F16, False, LLAMA3))
    if kind == "decode":
        return _build(mine.attention_decode_cpu(H_KV, H_Q, d, F16, False, LLAMA3))
    if kind == "merge":
        return _build(mine.merge_state_inplace_cpu(F16))
    raise ValueError(kind)


def _f16(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(F16)


def _layout(rng, kv_lens: list[int], d: int):
    return _paged_layout(rng, kv_lens, d, make=lambda x: x.astype(F16))


@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("rotary", [0, 1])
def test_decode_float16_pages(d, rotary):
    rng = np.random.default_rng(7 + d + rotary)
    kv_lens = [1, 17, 300, 0, 45]
    pages, indptr, values, last = _layout(rng, kv_lens, d)
    bsz = len(kv_lens)
    q = _f16(rng, bsz, H_Q, d)
    k_off = np.array([0, 5, 2, 0, 9], "int32")
    q_pos = np.array([ln - 1 + off for ln, off in zip(kv_lens, k_off, strict=True)], "int32")
    sm_scale = 1.0 / math.sqrt(d)
    o, lse = _nd(np.zeros((bsz, H_Q, d), F16)), _nd(np.zeros((bsz, H_Q), "float32"))
    _kernel("decode", d)(
        _nd(q), _nd(pages), _nd(indptr), _nd(values), _nd(last), _nd(k_off), _nd(q_pos), o, lse,
        rotary, ROPE_SCALE, THETA, sm_scale,
    )  # fmt: skip
    out, lse_out = o.numpy(), lse.numpy()
    assert out.dtype == np.float16
    for b, ln in enumerate(kv_lens):
        if ln == 0:
            assert np.all(out[b] == 0)
            continue
        k, v = _gather_kv(pages, indptr, values, ln, b)
        qb = q[b : b + 1].astype(np.float64)
        if rotary:  # the kernel rounds rotated q and k to the KV dtype, as the stock kernels do
            qb = _rope(qb, q_pos[b : b + 1]).astype(F16).astype(np.float64)
            k = _rope(k, k_off[b] + np.arange(ln)).astype(F16).astype(np.float64)
        o_ref, lse_ref = _ref_attention(qb, k, v, sm_scale, np.ones((1, ln), bool))
        np.testing.assert_allclose(out[b].astype(np.float64), o_ref[0], **TOL)
        np.testing.assert_allclose(lse_out[b], lse_ref[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [1, 0])
def test_paged_prefill_float16_pages(causal):
    d = 64
    rng = np.random.default_rng(30 + causal)
    kv_lens, q_lens = [40, 16, 90], [5, 16, 33]
    pages, p_indptr, values, last = _layout(rng, kv_lens, d)
    q_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype("int32")
    n = int(q_indptr[-1])
    q = _f16(rng, n, H_Q, d)
    k_off = np.zeros(len(kv_lens), "int32")
    q_pos = np.concatenate([np.arange(kl - ql, kl) for kl, ql in zip(kv_lens, q_lens, strict=True)]).astype("int32")
    sm_scale = 1.0 / math.sqrt(d)
    o, lse = _nd(np.zeros((n, H_Q, d), F16)), _nd(np.zeros((n, H_Q), "float32"))
    _kernel("paged", d)(
        _nd(q), _nd(q_indptr), _nd(pages), _nd(p_indptr), _nd(values), _nd(last), _nd(k_off), _nd(q_pos), o, lse,
        causal, 0, ROPE_SCALE, THETA, sm_scale,
    )  # fmt: skip
    out = o.numpy()
    for b, (kl, ql) in enumerate(zip(kv_lens, q_lens, strict=True)):
        k, v = _gather_kv(pages, p_indptr, values, kl, b)
        sl = slice(q_indptr[b], q_indptr[b + 1])
        rows = np.arange(kl - ql, kl)[:, None]
        visible = (np.arange(kl)[None, :] <= rows) if causal else np.ones((ql, kl), bool)
        o_ref, lse_ref = _ref_attention(q[sl].astype(np.float64), k, v, sm_scale, visible)
        np.testing.assert_allclose(out[sl].astype(np.float64), o_ref, **TOL)
        np.testing.assert_allclose(lse.numpy()[sl], lse_ref, rtol=1e-4, atol=1e-4)


def test_ragged_prefill_float16():
    d = 64
    rng = np.random.default_rng(51)
    lens = [37, 1, 70]
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype("int32")
    n = int(indptr[-1])
    q, k, v = _f16(rng, n, H_Q, d), _f16(rng, n, H_KV, d), _f16(rng, n, H_KV, d)
    k_off = np.zeros(len(lens), "int32")
    q_pos = np.concatenate([np.arange(ln) for ln in lens]).astype("int32")
    sm_scale = 1.0 / math.sqrt(d)
    o, lse = _nd(np.zeros((n, H_Q, d), F16)), _nd(np.zeros((n, H_Q), "float32"))
    _kernel("ragged", d)(
        _nd(q), _nd(indptr), _nd(k), _nd(v), _nd(indptr), _nd(q_pos), _nd(k_off), o, lse,
        1, 0, ROPE_SCALE, THETA, sm_scale,
    )  # fmt: skip
    for b, ln in enumerate(lens):
        sl = slice(indptr[b], indptr[b + 1])
        o_ref, lse_ref = _ref_attention(
            q[sl].astype(np.float64),
            k[sl].astype(np.float64),
            v[sl].astype(np.float64),
            sm_scale,
            np.tril(np.ones((ln, ln), bool)),
        )
        np.testing.assert_allclose(o.numpy()[sl].astype(np.float64), o_ref, **TOL)
        np.testing.assert_allclose(lse.numpy()[sl], lse_ref, rtol=1e-4, atol=1e-4)


def test_merge_state_float16():
    rng = np.random.default_rng(3)
    v1, v2 = _f16(rng, 6, H_Q, 64), _f16(rng, 6, H_Q, 64)
    s1, s2 = rng.standard_normal((6, H_Q)).astype("float32"), rng.standard_normal((6, H_Q)).astype("float32")
    v, s = _nd(v1.copy()), _nd(s1.copy())
    _kernel("merge", 0)(v, s, _nd(v2), _nd(s2))
    w1, w2 = np.exp2(s1.astype(np.float64)), np.exp2(s2.astype(np.float64))
    want = (v1 * (w1 / (w1 + w2))[..., None] + v2 * (w2 / (w1 + w2))[..., None]).astype(np.float64)
    np.testing.assert_allclose(v.numpy().astype(np.float64), want, **TOL)
    np.testing.assert_allclose(s.numpy(), np.log2(w1 + w2), rtol=1e-5, atol=1e-5)
