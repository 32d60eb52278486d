"""Parallel, vectorized CPU attention kernels for TVM's paged KV cache (`TIRPagedKVCache` on llvm).

The stock llvm kernels in `tvm.relax.frontend.nn.llm` are serial scalar loops. The kernels here keep
their exact PrimFunc signatures (parameter order, buffer shapes/dtypes, symbolic vars) and semantics,
so a compiled module can swap `mod[name]` for them:

- scores live in the log2 domain: `s = (q . k) * sm_scale * log2(e)`, and `lse = m + log2(sum exp2(s - m))`
  (what `tir_attention_merge_state_cpu` consumes);
- running state starts at `m = -5e4`, `l = 1.0`, so a sequence with no visible key yields `o = 0`,
  `lse = -5e4` (the merge step then ignores it);
- `rotary_mode == 1` (the C++ passes `rope_mode == kInline`) rotates q and k on the fly; k positions are
  `k_rope_pos_offset[b] + position in the kv chunk`, q positions come from `q_rope_position`.

Work is split across threads with `T.parallel` over (query tile, kv head) for prefill and
(sequence, kv head) for decode; all query heads of a GQA group are processed together so every K/V row
is loaded once per group. Inner products are vectorized along keys (QK^T against a transposed K tile)
and along head_dim (PV); exp2 is a vectorizable polynomial.

Gotcha (TVM 0.27): `x = expr` bindings inside a `T.vectorized` loop miscompile, so vector bodies below
use only buffer loads/stores.
"""

from __future__ import annotations

import math
from typing import Any

import tvm
from tvm import tirx
from tvm.script import tirx as T

__all__ = [
    "attention_decode_cpu",
    "attention_prefill_cpu",
    "attention_prefill_ragged_cpu",
    "cpu_attention_kernels",
    "merge_state_inplace_cpu",
]

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


def _row_block(rows: int) -> int:
    """Rows per register block of the GEMM micro-kernels (3 x 4 ymm accumulators)."""
    return next(bs for bs in (3, 2, 1) if rows % bs == 0)


def attention_prefill_ragged_cpu(
    h_kv: int,
    h_q: int,
    d_qk: int,
    d_v: int,
    dtype: str,
    rope_scaling: dict[str, Any] | None,
    *,
    tile_q: int = 8,
    tile_k: int = 32,
) -> tirx.PrimFunc:
    """Ragged (new q vs new k/v) prefill attention; same signature as stock `_attention_prefill_ragged_cpu`."""
    rope_table = _make_rope_table(_norm_rope_scaling(rope_scaling), d_qk)
    half = d_qk // 2
    group = h_q // h_kv
    tq, tk = tile_q, tile_k
    rows = tq * group
    bs = _row_block(rows)
    dvb = 32 if d_v % 32 == 0 else d_v

    @T.prim_func
    def batch_prefill_ragged_kv(
        var_q: T.handle,  # [total_len, h_q, d_qk]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_k: T.handle,  # [total_len, h_kv, d_qk]
        var_v: T.handle,  # [total_len, h_kv, d_v]
        var_kv_indptr: T.handle,  # [batch_size + 1]
        var_q_rope_position: T.handle,  # [total_q_len]
        var_k_rope_pos_offset: T.handle,  # [b]
        var_output: T.handle,  # [total_len, h_q, d_v]
        var_lse: T.handle,  # [total_len, h_q]
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()

        q = T.match_buffer(var_q, (qo_len, h_q, d_qk), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d_qk), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d_v), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        q_rope_position = T.match_buffer(
            var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_position_elem_offset
        )
        k_rope_pos_offset = T.match_buffer(
            var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset
        )
        output = T.match_buffer(var_output, (qo_len, h_q, d_v), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")

        for b in range(batch_size):
            q_beg = q_indptr[b]
            q_n = q_indptr[b + 1] - q_beg
            k_beg = kv_indptr[b]
            k_n = kv_indptr[b + 1] - k_beg
            n_tiles = (q_n + tq - 1) // tq
            for item in T.parallel(n_tiles * h_kv):
                q_tile = T.alloc_local((rows, d_qk), "float32")
                k_tile = T.alloc_local((d_qk, tk), "float32")
                s_tile = T.alloc_local((rows, tk), "float32")
                o_tile = T.alloc_local((rows, d_v), "float32")
                m_r = T.alloc_local((rows,), "float32")
                l_r = T.alloc_local((rows,), "float32")
                scal = T.alloc_local((4,), "float32")
                tmp_n = T.alloc_local((tk,), "float32")
                tmp_f = T.alloc_local((tk,), "float32")
                cs = T.alloc_local((half,), "float32")
                sn = T.alloc_local((half,), "float32")
                # zig-zag tile order: each thread's contiguous block of items mixes short and long causal rows
                zz = item // h_kv
                hk = item % h_kv
                r0 = T.if_then_else(zz % 2 == 0, zz // 2, n_tiles - 1 - zz // 2) * tq
                nq = T.min(tq, q_n - r0)
                k_end = T.if_then_else(causal > 0, T.max(T.min(k_n, k_n - q_n + r0 + nq), 0), k_n)
                scal[3] = sm_scale * _f32(LOG2E)
                # rows past the sequence end load (and later drop) a copy of its last row
                if rotary_mode == 1:
                    for qi in range(tq):
                        rope_table(cs, sn, q_rope_position[q_beg + T.min(r0 + qi, q_n - 1)], rope_scale, rope_theta)
                        for g in range(group):
                            for i in T.vectorized(half):
                                q_tile[qi * group + g, i] = scal[3] * (
                                    cs[i] * q[q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, i].astype("float32")
                                    + sn[i]
                                    * (-q[q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, i + half]).astype("float32")
                                ).astype(dtype).astype("float32")
                            for i in T.vectorized(half):
                                q_tile[qi * group + g, i + half] = scal[3] * (
                                    cs[i]
                                    * q[q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, i + half].astype("float32")
                                    + sn[i] * q[q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, i].astype("float32")
                                ).astype(dtype).astype("float32")
                else:
                    for qi, g in T.grid(tq, group):
                        for d in T.vectorized(d_qk):
                            q_tile[qi * group + g, d] = scal[3] * q[
                                q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, d
                            ].astype("float32")
                for r in range(rows):
                    m_r[r] = _f32(INIT_M)
                    l_r[r] = _f32(1.0)
                    for d in T.vectorized(d_v):
                        o_tile[r, d] = _f32(0.0)

                for kt in range((k_end + tk - 1) // tk):
                    # keys past k_end load a copy of a valid row and are masked out below
                    if rotary_mode == 1:
                        for j in range(tk):
                            rope_table(
                                cs, sn, k_rope_pos_offset[b] + T.min(kt * tk + j, k_n - 1), rope_scale, rope_theta
                            )
                            for i in range(half):
                                k_tile[i, j] = (
                                    (
                                        cs[i] * k[k_beg + T.min(kt * tk + j, k_n - 1), hk, i].astype("float32")
                                        + sn[i]
                                        * (-k[k_beg + T.min(kt * tk + j, k_n - 1), hk, i + half]).astype("float32")
                                    )
                                    .astype(dtype)
                                    .astype("float32")
                                )
                                k_tile[i + half, j] = (
                                    (
                                        cs[i] * k[k_beg + T.min(kt * tk + j, k_n - 1), hk, i + half].astype("float32")
                                        + sn[i] * k[k_beg + T.min(kt * tk + j, k_n - 1), hk, i].astype("float32")
                                    )
                                    .astype(dtype)
                                    .astype("float32")
                                )
                    else:
                        for j, d in T.grid(tk, d_qk):
                            k_tile[d, j] = k[k_beg + T.min(kt * tk + j, k_n - 1), hk, d].astype("float32")
                    for r in range(rows):
                        for j in T.vectorized(tk):
                            s_tile[r, j] = _f32(0.0)
                    for rb in range(rows // bs):
                        for d in range(d_qk):
                            for u in T.unroll(bs):
                                for j in T.vectorized(tk):
                                    s_tile[rb * bs + u, j] = (
                                        s_tile[rb * bs + u, j] + q_tile[rb * bs + u, d] * k_tile[d, j]
                                    )
                    for r in range(rows):
                        _online_softmax_tile(
                            s_tile,
                            r,
                            tk,
                            0,
                            T.if_then_else(
                                causal > 0,
                                T.min(T.min(tk, k_end - kt * tk), k_n - q_n + r0 + r // group + 1 - kt * tk),
                                T.min(tk, k_end - kt * tk),
                            ),
                            m_r,
                            l_r,
                            o_tile,
                            d_v,
                            scal,
                            tmp_n,
                            tmp_f,
                        )
                    for rb, dh in T.grid(rows // bs, d_v // dvb):
                        for j in range(T.min(tk, k_end - kt * tk)):
                            for u in T.unroll(bs):
                                for d in T.vectorized(dvb):
                                    o_tile[rb * bs + u, dh * dvb + d] = o_tile[rb * bs + u, dh * dvb + d] + s_tile[
                                        rb * bs + u, j
                                    ] * v[k_beg + kt * tk + j, hk, dh * dvb + d].astype("float32")

                for qi in range(nq):
                    for g in range(group):
                        scal[3] = _f32(1.0) / l_r[qi * group + g]
                        for d in T.vectorized(d_v):
                            output[q_beg + r0 + qi, hk * group + g, d] = (o_tile[qi * group + g, d] * scal[3]).astype(
                                dtype
                            )
                        lse[q_beg + r0 + qi, hk * group + g] = m_r[qi * group + g] + T.log2(l_r[qi * group + g])

    return batch_prefill_ragged_kv


def attention_prefill_cpu(
    h_kv: int,
    h_q: int,
    d: int,
    dtype: str,
    sliding_window: bool,
    rope_scaling: dict[str, Any] | None,
    page_size: int = 16,
    sliding_window_size: int = 1024,
    *,
    tile_q: int = 8,
    tile_k: int = 32,
) -> tirx.PrimFunc:
    """Paged prefill attention (chunk queries vs cached pages); same signature as stock `_attention_prefill_cpu`."""
    rope_table = _make_rope_table(_norm_rope_scaling(rope_scaling), d)
    half = d // 2
    group = h_q // h_kv
    tq, tk = tile_q, tile_k
    rows = tq * group
    bs = _row_block(rows)
    dvb = 32 if d % 32 == 0 else d
    sws = sliding_window_size if sliding_window else 0

    @T.prim_func
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle,  # [total_len, h_q, d]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch_size + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [b] when sliding window = False, or otherwise [3, b]
        var_k_rope_pos_offset: T.handle,  # [b]
        var_q_rope_position: T.handle,  # [total_len]
        var_output: T.handle,  # [total_len, h_q, d]
        var_lse: T.handle,  # [total_len, h_q]
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(
            var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset
        )
        q_rope_position = T.match_buffer(
            var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_position_elem_offset
        )
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        length_info = _declare_length_info(var_length_info, batch_size, sliding_window, length_info_elem_offset)

        for b in range(batch_size):
            q_beg = q_indptr[b]
            q_n = q_indptr[b + 1] - q_beg
            p_beg = page_indptr[b]
            k_n = T.if_then_else(
                p_beg != page_indptr[b + 1],
                _chunk_len(page_indptr[b + 1] - p_beg, page_size, b, length_info, sliding_window),
                0,
            )
            n_tiles = (q_n + tq - 1) // tq
            for item in T.parallel(n_tiles * h_kv):
                q_tile = T.alloc_local((rows, d), "float32")
                k_tile = T.alloc_local((d, tk), "float32")
                v_tile = T.alloc_local((tk, d), "float32")
                s_tile = T.alloc_local((rows, tk), "float32")
                o_tile = T.alloc_local((rows, d), "float32")
                m_r = T.alloc_local((rows,), "float32")
                l_r = T.alloc_local((rows,), "float32")
                scal = T.alloc_local((4,), "float32")
                tmp_n = T.alloc_local((tk,), "float32")
                tmp_f = T.alloc_local((tk,), "float32")
                cs = T.alloc_local((half,), "float32")
                sn = T.alloc_local((half,), "float32")
                slot = T.alloc_local((tk,), "int32")
                page = T.alloc_local((tk,), "int32")
                zz = item // h_kv
                hk = item % h_kv
                r0 = T.if_then_else(zz % 2 == 0, zz // 2, n_tiles - 1 - zz // 2) * tq
                nq = T.min(tq, q_n - r0)
                # visible keys of row i: [lo_i, hi_i) with
                #   causal (no window): hi_i = k_n - q_n + i + 1;  causal + window: lo_i = k_n - max(sws - i - 1, 0)
                k_end = T.if_then_else(tirx.all(causal > 0, sws == 0), T.max(T.min(k_n, k_n - q_n + r0 + nq), 0), k_n)
                k_start = T.if_then_else(tirx.all(causal > 0, sws > 0), T.max(k_n - T.max(sws - r0 - 1, 0), 0), 0)
                scal[3] = sm_scale * _f32(LOG2E)
                if rotary_mode == 1:
                    for qi in range(tq):
                        rope_table(cs, sn, q_rope_position[q_beg + T.min(r0 + qi, q_n - 1)], rope_scale, rope_theta)
                        for g in range(group):
                            for i in T.vectorized(half):
                                q_tile[qi * group + g, i] = scal[3] * (
                                    cs[i] * q[q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, i].astype("float32")
                                    + sn[i]
                                    * (-q[q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, i + half]).astype("float32")
                                ).astype(dtype).astype("float32")
                            for i in T.vectorized(half):
                                q_tile[qi * group + g, i + half] = scal[3] * (
                                    cs[i]
                                    * q[q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, i + half].astype("float32")
                                    + sn[i] * q[q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, i].astype("float32")
                                ).astype(dtype).astype("float32")
                else:
                    for qi, g in T.grid(tq, group):
                        for dd in T.vectorized(d):
                            q_tile[qi * group + g, dd] = scal[3] * q[
                                q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, dd
                            ].astype("float32")
                for r in range(rows):
                    m_r[r] = _f32(INIT_M)
                    l_r[r] = _f32(1.0)
                    for dd in T.vectorized(d):
                        o_tile[r, dd] = _f32(0.0)

                for kt in range(k_start // tk, (k_end + tk - 1) // tk):
                    # gather the tile's page slots; keys past k_end repeat a valid slot and are masked out
                    for j in range(tk):
                        slot[j] = _seq_offset(T.min(kt * tk + j, k_n - 1), b, length_info, sliding_window)
                        page[j] = page_values[p_beg + slot[j] // page_size]
                        slot[j] = slot[j] % page_size
                    if rotary_mode == 1:
                        for j in range(tk):
                            rope_table(
                                cs, sn, k_rope_pos_offset[b] + T.min(kt * tk + j, k_n - 1), rope_scale, rope_theta
                            )
                            for i in range(half):
                                k_tile[i, j] = (
                                    (
                                        cs[i] * pages[page[j], 0, hk, slot[j], i].astype("float32")
                                        + sn[i] * (-pages[page[j], 0, hk, slot[j], i + half]).astype("float32")
                                    )
                                    .astype(dtype)
                                    .astype("float32")
                                )
                                k_tile[i + half, j] = (
                                    (
                                        cs[i] * pages[page[j], 0, hk, slot[j], i + half].astype("float32")
                                        + sn[i] * pages[page[j], 0, hk, slot[j], i].astype("float32")
                                    )
                                    .astype(dtype)
                                    .astype("float32")
                                )
                    else:
                        for j, dd in T.grid(tk, d):
                            k_tile[dd, j] = pages[page[j], 0, hk, slot[j], dd].astype("float32")
                    for j in range(tk):
                        for dd in T.vectorized(d):
                            v_tile[j, dd] = pages[page[j], 1, hk, slot[j], dd].astype("float32")
                    for r in range(rows):
                        for j in T.vectorized(tk):
                            s_tile[r, j] = _f32(0.0)
                    for rb in range(rows // bs):
                        for dd in range(d):
                            for u in T.unroll(bs):
                                for j in T.vectorized(tk):
                                    s_tile[rb * bs + u, j] = (
                                        s_tile[rb * bs + u, j] + q_tile[rb * bs + u, dd] * k_tile[dd, j]
                                    )
                    for r in range(rows):
                        _online_softmax_tile(
                            s_tile,
                            r,
                            tk,
                            T.if_then_else(
                                tirx.all(causal > 0, sws > 0),
                                T.max(k_n - T.max(sws - (r0 + r // group) - 1, 0), 0) - kt * tk,
                                0,
                            ),
                            T.if_then_else(
                                tirx.all(causal > 0, sws == 0),
                                T.min(T.min(tk, k_end - kt * tk), k_n - q_n + r0 + r // group + 1 - kt * tk),
                                T.min(tk, k_end - kt * tk),
                            ),
                            m_r,
                            l_r,
                            o_tile,
                            d,
                            scal,
                            tmp_n,
                            tmp_f,
                        )
                    for rb, dh in T.grid(rows // bs, d // dvb):
                        for j in range(T.min(tk, k_end - kt * tk)):
                            for u in T.unroll(bs):
                                for dd in T.vectorized(dvb):
                                    o_tile[rb * bs + u, dh * dvb + dd] = (
                                        o_tile[rb * bs + u, dh * dvb + dd]
                                        + s_tile[rb * bs + u, j] * v_tile[j, dh * dvb + dd]
                                    )

                for qi in range(nq):
                    for g in range(group):
                        scal[3] = _f32(1.0) / l_r[qi * group + g]
                        for dd in T.vectorized(d):
                            output[q_beg + r0 + qi, hk * group + g, dd] = (o_tile[qi * group + g, dd] * scal[3]).astype(
                                dtype
                            )
                        lse[q_beg + r0 + qi, hk * group + g] = m_r[qi * group + g] + T.log2(l_r[qi * group + g])

    return batch_prefill_paged_kv_cpu


def attention_decode_cpu(
    num_kv_heads: int,
    num_qo_heads: int,
    head_dim: int,
    qkv_dtype: str,
    sliding_window: bool,
    rope_scaling: dict[str, Any] | None,
    page_size: int = 16,
) -> tirx.PrimFunc:
    """Paged decode attention (one query per sequence); same signature as stock `_attention_decode_cpu`."""
    rope_table = _make_rope_table(_norm_rope_scaling(rope_scaling), head_dim)
    h_kv, h_q, dd_n = num_kv_heads, num_qo_heads, head_dim
    half = dd_n // 2
    group = h_q // h_kv
    tk = 32 if page_size <= 32 else page_size
    lanes = 8 if dd_n % 8 == 0 else 1
    n_chunks = dd_n // lanes

    @T.prim_func
    def batch_decode_paged_kv(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,  # [b] when sliding window = False, or otherwise [3, b]
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        Q = T.match_buffer(Q_handle, (B, h_q, dd_n), qkv_dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, dd_n), qkv_dtype)
        page_table_indptr = T.match_buffer(
            page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset
        )
        page_table_values = T.match_buffer(
            page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset
        )
        k_rope_pos_offset = T.match_buffer(
            k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset
        )
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(output_handle, (B, h_q, dd_n), qkv_dtype)
        lse = T.match_buffer(lse_handle, (B, h_q), "float32")
        length_info = _declare_length_info(var_length_info, B, sliding_window, length_info_elem_offset)

        for item in T.parallel(B * h_kv):
            q_tile = T.alloc_local((group, dd_n), "float32")
            k_row = T.alloc_local((dd_n,), "float32")
            s_tile = T.alloc_local((group, tk), "float32")
            o_tile = T.alloc_local((group, dd_n), "float32")
            part = T.alloc_local((group, lanes), "float32")
            m_r = T.alloc_local((group,), "float32")
            l_r = T.alloc_local((group,), "float32")
            scal = T.alloc_local((4,), "float32")
            tmp_n = T.alloc_local((tk,), "float32")
            tmp_f = T.alloc_local((tk,), "float32")
            cs = T.alloc_local((half,), "float32")
            sn = T.alloc_local((half,), "float32")
            slot = T.alloc_local((tk,), "int32")
            page = T.alloc_local((tk,), "int32")
            b = item // h_kv
            hk = item % h_kv
            p_beg = page_table_indptr[b]
            k_n = T.if_then_else(
                p_beg != page_table_indptr[b + 1],
                _chunk_len(page_table_indptr[b + 1] - p_beg, page_size, b, length_info, sliding_window),
                0,
            )
            scal[3] = sm_scale * _f32(LOG2E)
            if rotary_mode == 1:
                rope_table(cs, sn, q_rope_position[b], rope_scale, rope_theta)
                for g in range(group):
                    for i in T.vectorized(half):
                        q_tile[g, i] = scal[3] * (
                            cs[i] * Q[b, hk * group + g, i].astype("float32")
                            + sn[i] * (-Q[b, hk * group + g, i + half]).astype("float32")
                        ).astype(qkv_dtype).astype("float32")
                    for i in T.vectorized(half):
                        q_tile[g, i + half] = scal[3] * (
                            cs[i] * Q[b, hk * group + g, i + half].astype("float32")
                            + sn[i] * Q[b, hk * group + g, i].astype("float32")
                        ).astype(qkv_dtype).astype("float32")
            else:
                for g in range(group):
                    for dd in T.vectorized(dd_n):
                        q_tile[g, dd] = scal[3] * Q[b, hk * group + g, dd].astype("float32")
            for g in range(group):
                m_r[g] = _f32(INIT_M)
                l_r[g] = _f32(1.0)
                for dd in T.vectorized(dd_n):
                    o_tile[g, dd] = _f32(0.0)

            for kt in range((k_n + tk - 1) // tk):
                for j in range(tk):
                    slot[j] = _seq_offset(T.min(kt * tk + j, k_n - 1), b, length_info, sliding_window)
                    page[j] = page_table_values[p_beg + slot[j] // page_size]
                    slot[j] = slot[j] % page_size
                for j in range(tk):
                    if rotary_mode == 1:
                        rope_table(cs, sn, k_rope_pos_offset[b] + T.min(kt * tk + j, k_n - 1), rope_scale, rope_theta)
                        for i in T.vectorized(half):
                            k_row[i] = (
                                (
                                    cs[i] * pages[page[j], 0, hk, slot[j], i].astype("float32")
                                    + sn[i] * (-pages[page[j], 0, hk, slot[j], i + half]).astype("float32")
                                )
                                .astype(qkv_dtype)
                                .astype("float32")
                            )
                        for i in T.vectorized(half):
                            k_row[i + half] = (
                                (
                                    cs[i] * pages[page[j], 0, hk, slot[j], i + half].astype("float32")
                                    + sn[i] * pages[page[j], 0, hk, slot[j], i].astype("float32")
                                )
                                .astype(qkv_dtype)
                                .astype("float32")
                            )
                    else:
                        for dd in T.vectorized(dd_n):
                            k_row[dd] = pages[page[j], 0, hk, slot[j], dd].astype("float32")
                    for g in range(group):
                        for ln in T.vectorized(lanes):
                            part[g, ln] = _f32(0.0)
                    for c in range(n_chunks):
                        for g in range(group):
                            for ln in T.vectorized(lanes):
                                part[g, ln] = part[g, ln] + q_tile[g, c * lanes + ln] * k_row[c * lanes + ln]
                    for g in range(group):
                        s_tile[g, j] = _f32(0.0)
                        for ln in range(lanes):
                            s_tile[g, j] = s_tile[g, j] + part[g, ln]
                for g in range(group):
                    _online_softmax_tile(
                        s_tile, g, tk, 0, T.min(tk, k_n - kt * tk), m_r, l_r, o_tile, dd_n, scal, tmp_n, tmp_f
                    )
                for j in range(T.min(tk, k_n - kt * tk)):
                    for g in range(group):
                        for dd in T.vectorized(dd_n):
                            o_tile[g, dd] = o_tile[g, dd] + s_tile[g, j] * pages[page[j], 1, hk, slot[j], dd].astype(
                                "float32"
                            )

            for g in range(group):
                scal[3] = _f32(1.0) / l_r[g]
                for dd in T.vectorized(dd_n):
                    output[b, hk * group + g, dd] = (o_tile[g, dd] * scal[3]).astype(qkv_dtype)
                lse[b, hk * group + g] = m_r[g] + T.log2(l_r[g])

    return batch_decode_paged_kv


def merge_state_inplace_cpu(v_dtype: str) -> tirx.PrimFunc:
    """`(v, s) <- merge((v, s), (v_other, s_other))` for log2-domain lse; same signature as the stock one."""

    @T.prim_func
    def merge_state_inplace_cpu(v: T.handle, s: T.handle, v_other: T.handle, s_other: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        N = T.int32()
        H = T.int32()
        D = T.int32()
        V = T.match_buffer(v, (N, H, D), v_dtype)
        S = T.match_buffer(s, (N, H), "float32")
        V_other = T.match_buffer(v_other, (N, H, D), v_dtype)
        S_other = T.match_buffer(s_other, (N, H), "float32")
        for n in T.parallel(N):
            w = T.alloc_local((4,), "float32")
            for h in range(H):
                w[0] = T.max(S[n, h], S_other[n, h])
                w[1] = T.exp2(S[n, h] - w[0])
                w[2] = T.exp2(S_other[n, h] - w[0])
                w[3] = w[1] + w[2]
                w[1] = w[1] / w[3]
                w[2] = w[2] / w[3]
                for d in range(D):
                    V[n, h, d] = (
                        V[n, h, d].astype("float32") * w[1] + V_other[n, h, d].astype("float32") * w[2]
                    ).astype(v_dtype)
                S[n, h] = T.log2(w[3]) + w[0]

    return merge_state_inplace_cpu


def cpu_attention_kernels(
    num_kv_heads: int,
    num_q_heads: int,
    head_dim: int,
    dtype: str,
    rope_scaling: dict[str, Any] | None,
    *,
    page_size: int = 16,
) -> dict[str, tvm.tirx.PrimFunc]:
    """Replacement kernels keyed by the names `TIRPagedKVCache` registers for llvm targets.

    Each PrimFunc carries `global_symbol` equal to its key.
    """
    funcs = {
        "tir_attention_prefill_ragged_cpu": attention_prefill_ragged_cpu(
            num_kv_heads, num_q_heads, head_dim, head_dim, dtype, rope_scaling
        ),
        "tir_attention_prefill_cpu": attention_prefill_cpu(
            num_kv_heads, num_q_heads, head_dim, dtype, False, rope_scaling, page_size
        ),
        "tir_attention_decode_cpu": attention_decode_cpu(
            num_kv_heads, num_q_heads, head_dim, dtype, False, rope_scaling, page_size
        ),
        "tir_attention_merge_state_cpu": merge_state_inplace_cpu(dtype),
    }
    return {name: f.with_attr("global_symbol", name) for name, f in funcs.items()}
