"""The q8_0 KV kernels (`llama_relax.kernels.attention_q8`) against the float64 reference given the same quantized
q, K and V: what remains is float32 arithmetic and the output's own q8_0 rounding (half a quant step per block)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from test_attention_kernels import H_KV, H_Q, LLAMA3, THETA, _build, _nd, _paged_layout, _ref_attention, _rope

from llama_relax.kernels import attention_q8 as q8

D = 64
W = q8.row_width(D)


def quantize(x: np.ndarray) -> np.ndarray:
    """float rows [..., D] -> q8_0 rows [..., W] int8 (llama.cpp's q8_0: scale = amax / 127 as float16)."""
    blocks = x.reshape(*x.shape[:-1], D // 32, 32).astype(np.float64)
    amax = np.abs(blocks).max(-1, keepdims=True)
    scale = (amax / 127).astype(np.float16)
    q = np.round(np.where(amax > 0, blocks * 127 / np.where(amax > 0, amax, 1), 0)).astype(np.int8)
    sbytes = scale.view(np.int8).reshape(*x.shape[:-1], 2 * (D // 32))
    return np.concatenate([q.reshape(*x.shape[:-1], D), sbytes], axis=-1)


def dequantize(r: np.ndarray) -> np.ndarray:
    q = r[..., :D].astype(np.float64).reshape(*r.shape[:-1], D // 32, 32)
    scale = np.ascontiguousarray(r[..., D:]).view(np.float16).astype(np.float64)[..., None]
    return (q * scale).reshape(*r.shape[:-1], D)


def _step(x: np.ndarray) -> np.ndarray:
    """The q8_0 rounding bound per value of float rows [..., D]: half a quant step, plus up to 127 steps times the
    float16 scale's relative rounding (2^-11), as llama.cpp quantizes with the exact scale and stores it rounded."""
    amax = np.abs(x.reshape(*x.shape[:-1], D // 32, 32)).max(-1, keepdims=True)
    return np.broadcast_to(amax / 127 * (0.5 + 127 * 2**-11) + 1e-6, (*x.shape[:-1], D // 32, 32)).reshape(x.shape)


@functools.cache
def _kernel(kind: str):
    return _build(
        {
            "decode": lambda: q8.attention_decode_q8(H_KV, H_Q, D),
            "paged": lambda: q8.attention_prefill_q8(H_KV, H_Q, D),
            "ragged": lambda: q8.attention_prefill_ragged_q8(H_KV, H_Q, D),
            "merge": lambda: q8.merge_state_q8(D),
            "rope": lambda: q8.rope_quantize_q8(H_Q, H_KV, D, LLAMA3, THETA),
            "deq": lambda: q8.dequantize_q8(H_Q, D),
        }[kind]()
    )


def _assert_q8_close(got_rows: np.ndarray, want: np.ndarray) -> None:
    got = dequantize(got_rows)
    err = np.abs(got - want) - _step(want) - 1e-4 * np.abs(want)
    assert err.max() <= 0, f"off by {err.max():.2e} beyond half a quant step"


def _layout(rng, kv_lens):
    return _paged_layout(rng, kv_lens, D, make=quantize)


def _kv(pages, indptr, values, n, b):
    ids = values[indptr[b] : indptr[b + 1]]
    f = dequantize(pages[ids])  # [p, 2, H_KV, 16, D]
    k = f[:, 0].transpose(0, 2, 1, 3).reshape(-1, H_KV, D)[:n]
    v = f[:, 1].transpose(0, 2, 1, 3).reshape(-1, H_KV, D)[:n]
    return k, v


def test_row_format_round_trip():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, D)) * 4
    r = quantize(x)
    assert r.shape == (5, 3, 68) and r.dtype == np.int8
    assert np.all(np.abs(dequantize(r) - x) <= _step(x) * 1.01 + 1e-3)


def test_decode_q8():
    rng = np.random.default_rng(1)
    kv_lens = [1, 17, 300, 0, 45]
    pages, indptr, values, last = _layout(rng, kv_lens)
    bsz = len(kv_lens)
    q = quantize(rng.standard_normal((bsz, H_Q, D)))
    sm = 1 / math.sqrt(D)
    o, lse = _nd(np.zeros((bsz, H_Q, W), "int8")), _nd(np.zeros((bsz, H_Q), "float32"))
    zero = np.zeros(bsz, "int32")
    _kernel("decode")(
        _nd(q), _nd(pages), _nd(indptr), _nd(values), _nd(last), _nd(zero), _nd(zero), o, lse, 0, 1.0, THETA, sm
    )
    for b, n in enumerate(kv_lens):
        if n == 0:
            assert np.all(dequantize(o.numpy()[b]) == 0)
            continue
        k, v = _kv(pages, indptr, values, n, b)
        o_ref, lse_ref = _ref_attention(dequantize(q[b : b + 1]), k, v, sm, np.ones((1, n), bool))
        _assert_q8_close(o.numpy()[b : b + 1], o_ref)
        np.testing.assert_allclose(lse.numpy()[b], lse_ref[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [1, 0])
def test_paged_prefill_q8(causal):
    rng = np.random.default_rng(2 + causal)
    kv_lens, q_lens = [40, 16, 90], [5, 16, 33]
    pages, p_indptr, values, last = _layout(rng, kv_lens)
    q_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype("int32")
    n = int(q_indptr[-1])
    q = quantize(rng.standard_normal((n, H_Q, D)))
    sm = 1 / math.sqrt(D)
    o, lse = _nd(np.zeros((n, H_Q, W), "int8")), _nd(np.zeros((n, H_Q), "float32"))
    zeros = np.zeros(len(kv_lens), "int32")
    _kernel("paged")(
        _nd(q), _nd(q_indptr), _nd(pages), _nd(p_indptr), _nd(values), _nd(last), _nd(zeros),
        _nd(np.zeros(n, "int32")), o, lse, causal, 0, 1.0, THETA, sm,
    )  # fmt: skip
    for b, (kl, ql) in enumerate(zip(kv_lens, q_lens, strict=True)):
        k, v = _kv(pages, p_indptr, values, kl, b)
        sl = slice(q_indptr[b], q_indptr[b + 1])
        rows = np.arange(kl - ql, kl)[:, None]
        visible = (np.arange(kl)[None, :] <= rows) if causal else np.ones((ql, kl), bool)
        o_ref, lse_ref = _ref_attention(dequantize(q[sl]), k, v, sm, visible)
        _assert_q8_close(o.numpy()[sl], o_ref)
        np.testing.assert_allclose(lse.numpy()[sl], lse_ref, rtol=1e-4, atol=1e-4)


def test_ragged_prefill_q8():
    rng = np.random.default_rng(5)
    lens = [37, 1, 70]
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype("int32")
    n = int(indptr[-1])
    q, k, v = (quantize(rng.standard_normal((n, h, D))) for h in (H_Q, H_KV, H_KV))
    sm = 1 / math.sqrt(D)
    o, lse = _nd(np.zeros((n, H_Q, W), "int8")), _nd(np.zeros((n, H_Q), "float32"))
    _kernel("ragged")(
        _nd(q), _nd(indptr), _nd(k), _nd(v), _nd(indptr), _nd(np.zeros(n, "int32")),
        _nd(np.zeros(len(lens), "int32")), o, lse, 1, 0, 1.0, THETA, sm,
    )  # fmt: skip
    for b, ln in enumerate(lens):
        sl = slice(indptr[b], indptr[b + 1])
        o_ref, lse_ref = _ref_attention(
            dequantize(q[sl]), dequantize(k[sl]), dequantize(v[sl]), sm, np.tril(np.ones((ln, ln), bool))
        )
        _assert_q8_close(o.numpy()[sl], o_ref)
        np.testing.assert_allclose(lse.numpy()[sl], lse_ref, rtol=1e-4, atol=1e-4)


def test_merge_q8():
    rng = np.random.default_rng(6)
    v1, v2 = quantize(rng.standard_normal((6, H_Q, D))), quantize(rng.standard_normal((6, H_Q, D)))
    s1, s2 = rng.standard_normal((6, H_Q)).astype("float32"), rng.standard_normal((6, H_Q)).astype("float32")
    v, s = _nd(v1.copy()), _nd(s1.copy())
    _kernel("merge")(v, s, _nd(v2), _nd(s2))
    w1, w2 = np.exp2(s1.astype(np.float64)), np.exp2(s2.astype(np.float64))
    want = dequantize(v1) * (w1 / (w1 + w2))[..., None] + dequantize(v2) * (w2 / (w1 + w2))[..., None]
    _assert_q8_close(v.numpy(), want)
    np.testing.assert_allclose(s.numpy(), np.log2(w1 + w2), rtol=1e-5, atol=1e-5)


def test_rope_quantize_and_dequantize():
    rng = np.random.default_rng(7)
    n = 40
    qkv = rng.standard_normal((n, H_Q + 2 * H_KV, D)).astype("float32")
    pos = rng.integers(0, 200, n).astype("int32")
    out = _nd(np.zeros((n, H_Q + 2 * H_KV, W), "int8"))
    _kernel("rope")(_nd(qkv), _nd(pos), out)
    want = qkv.astype(np.float64).copy()
    want[:, : H_Q + H_KV] = _rope(want[:, : H_Q + H_KV], pos)
    _assert_q8_close(out.numpy(), want)
    back = _nd(np.zeros((n, H_Q, D), "float32"))
    _kernel("deq")(_nd(out.numpy()[:, :H_Q].copy()), back)
    np.testing.assert_allclose(back.numpy(), dequantize(out.numpy()[:, :H_Q]), rtol=1e-6, atol=1e-6)
