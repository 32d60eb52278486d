"""Shared pieces of the CPU attention kernels: constants, RoPE tables, the paged-KV length helpers, and the
vectorized exp2 / online-softmax macros (see `attention_cpu` for the conventions they implement)."""

from __future__ import annotations

import math
from typing import Any

from tvm import tirx
from tvm.script import tirx as T

LOG2E = math.log2(math.e)
INIT_M = -5e4  # initial running max (log2 domain), as in the stock kernels
MASKED = -1e30  # score of a masked key; exp2 of it (minus any max) is exactly 0
# 2**f on [-0.5, 0.5], least-squares fit of the relative error (max rel. error ~1e-7 in float32).
_EXP2_POLY = (
    1.0,
    0.693147206,
    0.240226466,
    0.0555032897,
    0.00961851959,
    0.00133998699,
    0.000153375851,
)


def _f32(x: float) -> tirx.PrimExpr:
    return tirx.const(x, "float32")


def _norm_rope_scaling(rope_scaling: dict[str, Any] | None) -> dict[str, Any]:
    if not rope_scaling or rope_scaling.get("rope_type") in (None, "default"):
        return {"rope_type": "default"}
    return dict(rope_scaling)


def _make_rope_table(rope_scaling: dict[str, Any], dim: int):
    """Macro filling `cs[i], sn[i]` (i < dim/2) with cos/sin of the RoPE angle at position `pos`.

    Mirrors the frequency formulas of TVM's `rope_freq_default` / `rope_freq_llama3` term for term (so the
    inline-rope results match the stock kernels), but without float Let bindings: those crash the llvm
    codegen's analyzer in TVM 0.27 when their value contains an int->float cast.
    """
    half = dim // 2
    rope_type = rope_scaling.get("rope_type", "default")
    if rope_type == "default":

        @T.macro
        def rope_table(cs, sn, pos, rope_scale, rope_theta):
            for i in range(half):
                cs[i] = (pos * rope_scale) / tirx.power(rope_theta, i * 2 % dim / tirx.const(dim, "float32"))
                sn[i] = T.sin(cs[i])
                cs[i] = T.cos(cs[i])

        return rope_table
    if rope_type == "llama3":
        inv_diff = 1.0 / (rope_scaling["high_freq_factor"] - rope_scaling["low_freq_factor"])
        inv_factor = 1.0 / rope_scaling["factor"]
        alpha = rope_scaling["original_max_position_embeddings"] / (2 * math.pi) * inv_diff
        beta = rope_scaling["low_freq_factor"] * inv_diff

        @T.macro
        def rope_table(cs, sn, pos, rope_scale, rope_theta):
            for i in range(half):
                # cs <- original inverse frequency, sn <- smoothing weight, then cs <- angle
                cs[i] = tirx.const(1, "float32") / tirx.power(rope_theta, i * 2 % dim / tirx.const(dim, "float32"))
                sn[i] = T.max(_f32(0.0), T.min(_f32(1.0), _f32(alpha) * cs[i] - _f32(beta)))
                cs[i] = (pos * rope_scale) * ((_f32(1.0) - sn[i]) * cs[i] * _f32(inv_factor) + sn[i] * cs[i])
                sn[i] = T.sin(cs[i])
                cs[i] = T.cos(cs[i])

        return rope_table
    raise ValueError(f"unsupported rope_type {rope_type!r} for the CPU attention kernels")


def _declare_length_info(var_length_info, batch_size, sliding_window: bool, elem_offset):
    if sliding_window:
        return T.match_buffer(var_length_info, (3, batch_size), "int32", elem_offset=elem_offset)
    return T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=elem_offset)


def _chunk_len(num_pages, page_size: int, b, length_info, sliding_window: bool):
    """Number of kv positions visible to sequence `b` in its page chunk."""
    if not sliding_window:
        return (num_pages - 1) * page_size + length_info[b]
    return (num_pages - 1) * page_size + length_info[0, b] - length_info[1, b] + length_info[2, b]


def _seq_offset(pos, b, length_info, sliding_window: bool):
    """Slot (within the chunk's pages) of chunk position `pos`: skips the evicted part after the sinks."""
    if not sliding_window:
        return pos
    return T.if_then_else(pos < length_info[2, b], pos, pos - length_info[2, b] + length_info[1, b])


@T.macro
def _prefetch_row(pages, page, hk, slot, row_lines: int, line_elems: int, row: int):
    """Prefetch (into all cache levels) the K and V rows of one key: `row` elements each, `line_elems` per line.
    A head's rows are 2-4 KiB runs 12+ KiB apart, which the hardware prefetchers do not follow (measured: decode
    loads stalled on memory, not on bandwidth)."""
    for kv, ln in T.grid(2, row_lines):
        T.evaluate(
            T.call_llvm_intrin(
                "void",
                "llvm.prefetch",
                T.address_of(pages[page, kv, hk, slot, T.min(ln * line_elems, row - 1)]),
                0,
                3,
                1,
            )
        )


@T.macro
def _exp2_row(buf, r, n: int, tmp_n, tmp_f):
    """In place `buf[r, :n] = exp2(buf[r, :n])` (inputs <= 0); exactly 0 below -126."""
    for j in T.vectorized(n):
        tmp_n[j] = T.floor(T.max(buf[r, j], _f32(-126.0)) + _f32(0.5))
    for j in T.vectorized(n):
        tmp_f[j] = T.max(buf[r, j], _f32(-126.0)) - tmp_n[j]
    for j in T.vectorized(n):
        buf[r, j] = T.Select(
            buf[r, j] < _f32(-126.0),
            _f32(0.0),
            T.reinterpret("float32", T.shift_left(T.Cast("int32", tmp_n[j]) + 127, 23))
            * (
                _f32(_EXP2_POLY[0])
                + tmp_f[j]
                * (
                    _f32(_EXP2_POLY[1])
                    + tmp_f[j]
                    * (
                        _f32(_EXP2_POLY[2])
                        + tmp_f[j]
                        * (
                            _f32(_EXP2_POLY[3])
                            + tmp_f[j]
                            * (_f32(_EXP2_POLY[4]) + tmp_f[j] * (_f32(_EXP2_POLY[5]) + tmp_f[j] * _f32(_EXP2_POLY[6])))
                        )
                    )
                )
            ),
        )


@T.macro
def _online_softmax_tile(s_buf, r, tk: int, lo, hi, m_r, l_r, o_buf, dv: int, scal, tmp_n, tmp_f):
    """Mask row `r` of the score tile to keys [lo, hi), fold it into (m, l), rescale o, leave p in s_buf."""
    for j in T.vectorized(tk):
        s_buf[r, j] = T.Select(tirx.all(j >= lo, j < hi), s_buf[r, j], _f32(MASKED))
    # row max: 8-lane partial maxima first (short dependency chains), then the lanes
    for ln in T.vectorized(8):
        tmp_n[ln] = s_buf[r, ln]
    for c in range(1, tk // 8):
        for ln in T.vectorized(8):
            tmp_n[ln] = T.max(tmp_n[ln], s_buf[r, c * 8 + ln])
    scal[0] = m_r[r]
    for ln in range(8):
        scal[0] = T.max(scal[0], tmp_n[ln])
    for j in T.vectorized(tk):
        s_buf[r, j] = s_buf[r, j] - scal[0]
    _exp2_row(s_buf, r, tk, tmp_n, tmp_f)
    scal[1] = T.exp2(m_r[r] - scal[0])
    m_r[r] = scal[0]
    for ln in T.vectorized(8):
        tmp_n[ln] = s_buf[r, ln]
    for c in range(1, tk // 8):
        for ln in T.vectorized(8):
            tmp_n[ln] = tmp_n[ln] + s_buf[r, c * 8 + ln]
    scal[2] = _f32(0.0)
    for ln in range(8):
        scal[2] = scal[2] + tmp_n[ln]
    l_r[r] = l_r[r] * scal[1] + scal[2]
    for d in T.vectorized(dv):
        o_buf[r, d] = o_buf[r, d] * scal[1]


def _make_q_tile_start(rope_table, tq: int, group: int, d_qk: int, d_v: int, dtype: str):
    """Macro starting a prefill query tile: load the `tq` query rows of kv head `hk` (all `group` q heads),
    scaled by `scal[3]` and RoPE-rotated when `rotary_mode == 1`, into `q_tile`; reset the online-softmax state
    (m, l, o). Rows past the sequence end load a copy of its last row (dropped on write-back)."""
    half = d_qk // 2
    rows = tq * group

    @T.macro
    def q_tile_start(
        q_tile,
        q,
        q_beg,
        q_n,
        r0,
        hk,
        scal,
        rotary_mode,
        cs,
        sn,
        q_rope_position,
        rope_scale,
        rope_theta,
        m_r,
        l_r,
        o_tile,
    ):
        if rotary_mode == 1:
            for qi in range(tq):
                rope_table(cs, sn, q_rope_position[q_beg + T.min(r0 + qi, q_n - 1)], rope_scale, rope_theta)
                for g in range(group):
                    for i in T.vectorized(half):
                        q_tile[qi * group + g, i] = scal[3] * (
                            cs[i] * q[q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, i].astype("float32")
                            + sn[i] * (-q[q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, i + half]).astype("float32")
                        ).astype(dtype).astype("float32")
                    for i in T.vectorized(half):
                        q_tile[qi * group + g, i + half] = scal[3] * (
                            cs[i] * q[q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, i + half].astype("float32")
                            + sn[i] * q[q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, i].astype("float32")
                        ).astype(dtype).astype("float32")
        else:
            for qi, g in T.grid(tq, group):
                for dd in T.vectorized(d_qk):
                    q_tile[qi * group + g, dd] = scal[3] * q[
                        q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, dd
                    ].astype("float32")
        for r in range(rows):
            m_r[r] = _f32(INIT_M)
            l_r[r] = _f32(1.0)
            for dd in T.vectorized(d_v):
                o_tile[r, dd] = _f32(0.0)

    return q_tile_start


def _row_block(rows: int) -> int:
    """Rows per register block of the GEMM micro-kernels (3 x 4 ymm accumulators)."""
    return next(bs for bs in (3, 2, 1) if rows % bs == 0)
