"""CPU attention kernels for a q8_0 KV cache, plus the model-side RoPE + quantize and dequantize kernels.

Row format (`llama_relax.kv_dtype`): a head's `d` values as `d` int8 quants, then one float16 scale per block of
32 values stored as its two bytes (little-endian): `W = d + d / 16` int8 elements. TVM's cache makes q, k, v, the
pages and the attention output share that format, so q arrives quantized and the output leaves quantized; inside,
everything is float32 (scores, softmax, the PV accumulator). The cache runs with rope mode `none`: the model
rotates q and k before quantizing (`rope_quantize_q8`), so these kernels never rotate (`rotary_mode` is ignored)
and there is no sliding window.

Signatures equal the stock kernels' with dtype int8 and head dim W, so `cpu_attention_kernels` can swap them in.
Conventions (log2-domain scores, the running state's start) as in `attention_cpu`.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.script import tirx as T

from llama_relax.kernels.attention_common import (
    INIT_M,
    LOG2E,
    _f32,
    _make_rope_table,
    _norm_rope_scaling,
    _online_softmax_tile,
    _prefetch_row,
    _row_block,
)

QB = 32  # values per block
I8 = "int8"


def row_width(d: int) -> int:
    return d + 2 * (d // QB)


def _scale(buf, idx: tuple, d: int, blk) -> tirx.PrimExpr:
    """The float16 scale of block `blk` of the row at `idx` (all indices but the last), as float32."""
    lo = buf[(*idx, d + 2 * blk)].astype("int16") & T.int16(255)
    hi = T.shift_left(buf[(*idx, d + 2 * blk + 1)].astype("int16"), T.int16(8))
    return T.reinterpret("float16", hi | lo).astype("float32")


def _make_quant_row(d: int):
    """Macro: quantize `src[r, 0:d]` (float32) into the q8_0 row `dst[n, h, 0:W]`; `tmp` holds >= 2 floats."""
    nb = d // QB

    @T.macro
    def quant_row(src, r, dst, n, h, tmp):
        for blk in range(nb):
            tmp[0] = _f32(0.0)
            for i in range(QB):
                tmp[0] = T.max(tmp[0], T.abs(src[r, blk * QB + i]))
            tmp[1] = T.if_then_else(tmp[0] > _f32(0.0), _f32(127.0) / tmp[0], _f32(0.0))
            dst[n, h, d + 2 * blk] = (T.reinterpret("int16", (tmp[0] / _f32(127.0)).astype("float16")) & 255).astype(I8)
            dst[n, h, d + 2 * blk + 1] = T.shift_right(
                T.reinterpret("int16", (tmp[0] / _f32(127.0)).astype("float16")), T.int16(8)
            ).astype(I8)
            for i in T.vectorized(QB):
                dst[n, h, blk * QB + i] = T.round(src[r, blk * QB + i] * tmp[1]).astype(I8)

    return quant_row


def attention_decode_q8(h_kv: int, h_q: int, d: int, page_size: int = 16) -> tirx.PrimFunc:
    """Paged decode attention over q8_0 pages; the stock decode signature with dtype int8, head dim W."""
    w_n, nb, group, tk = row_width(d), d // QB, h_q // h_kv, 32
    lanes = 8
    per_blk = QB // lanes
    quant_row = _make_quant_row(d)
    row_lines = -(-w_n // 64)

    @T.prim_func
    def batch_decode_paged_kv_q8(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,
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
        o1 = T.int32()
        o2 = T.int32()
        o3 = T.int32()
        o4 = T.int32()
        o5 = T.int32()
        Q = T.match_buffer(Q_handle, (B, h_q, w_n), I8)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, w_n), I8)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=o1)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=o2)
        T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=o3)
        T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=o4)
        output = T.match_buffer(output_handle, (B, h_q, w_n), I8)
        lse = T.match_buffer(lse_handle, (B, h_q), "float32")
        length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=o5)

        for item in T.parallel(B * h_kv):
            q_tile = T.alloc_local((group, d), "float32")
            s_tile = T.alloc_local((group, tk), "float32")
            o_tile = T.alloc_local((group, d), "float32")
            part = T.alloc_local((group, lanes), "float32")
            m_r = T.alloc_local((group,), "float32")
            l_r = T.alloc_local((group,), "float32")
            scal = T.alloc_local((4,), "float32")
            tmp_n = T.alloc_local((tk,), "float32")
            tmp_f = T.alloc_local((tk,), "float32")
            ksc = T.alloc_local((tk, nb), "float32")
            vsc = T.alloc_local((tk, nb), "float32")
            slot = T.alloc_local((tk,), "int32")
            page = T.alloc_local((tk,), "int32")
            nxt = T.alloc_local((tk,), "int32")
            b = item // h_kv
            hk = item % h_kv
            p_beg = page_table_indptr[b]
            k_n = T.if_then_else(
                p_beg != page_table_indptr[b + 1],
                (page_table_indptr[b + 1] - p_beg - 1) * page_size + length_info[b],
                0,
            )
            scal[3] = sm_scale * _f32(LOG2E)
            for g, blk in T.grid(group, nb):
                for i in T.vectorized(QB):
                    q_tile[g, blk * QB + i] = (
                        scal[3]
                        * _scale(Q, (b, hk * group + g), d, blk)
                        * Q[b, hk * group + g, blk * QB + i].astype("float32")
                    )
            for g in range(group):
                m_r[g] = _f32(INIT_M)
                l_r[g] = _f32(1.0)
                for dd in T.vectorized(d):
                    o_tile[g, dd] = _f32(0.0)

            for kt in range((k_n + tk - 1) // tk):
                for j in range(tk):
                    slot[j] = T.min(kt * tk + j, k_n - 1)
                    page[j] = page_table_values[p_beg + slot[j] // page_size]
                    slot[j] = slot[j] % page_size
                    for blk in range(nb):
                        ksc[j, blk] = _scale(pages, (page[j], 0, hk, slot[j]), d, blk)
                        vsc[j, blk] = _scale(pages, (page[j], 1, hk, slot[j]), d, blk)
                for j in range(tk):  # prefetch the next tile's rows
                    nxt[j] = T.min((kt + 1) * tk + j, k_n - 1)
                    _prefetch_row(
                        pages,
                        page_table_values[p_beg + nxt[j] // page_size],
                        hk,
                        nxt[j] % page_size,
                        row_lines,
                        64,
                        w_n,
                    )
                for j in range(tk):
                    for g in range(group):
                        for ln in T.vectorized(lanes):
                            part[g, ln] = _f32(0.0)
                    for c in T.unroll(d // lanes):
                        for g in T.unroll(group):
                            for ln in T.vectorized(lanes):
                                part[g, ln] = part[g, ln] + q_tile[g, c * lanes + ln] * (
                                    pages[page[j], 0, hk, slot[j], c * lanes + ln].astype("float32")
                                    * ksc[j, c // per_blk]
                                )
                    for g in T.unroll(group):
                        for ln in T.vectorized(4):
                            part[g, ln] = part[g, ln] + part[g, ln + 4]
                        for ln in T.vectorized(2):
                            part[g, ln] = part[g, ln] + part[g, ln + 2]
                        s_tile[g, j] = part[g, 0] + part[g, 1]
                for g in range(group):
                    _online_softmax_tile(
                        s_tile, g, tk, 0, T.min(tk, k_n - kt * tk), m_r, l_r, o_tile, d, scal, tmp_n, tmp_f
                    )
                for j in range(T.min(tk, k_n - kt * tk)):
                    for g, blk in T.grid(group, nb):
                        for i in T.vectorized(QB):
                            o_tile[g, blk * QB + i] = o_tile[g, blk * QB + i] + (s_tile[g, j] * vsc[j, blk]) * pages[
                                page[j], 1, hk, slot[j], blk * QB + i
                            ].astype("float32")

            for g in range(group):
                scal[3] = _f32(1.0) / l_r[g]
                for dd in T.vectorized(d):
                    o_tile[g, dd] = o_tile[g, dd] * scal[3]
                quant_row(o_tile, g, output, b, hk * group + g, tmp_n)
                lse[b, hk * group + g] = m_r[g] + T.log2(l_r[g])

    return batch_decode_paged_kv_q8


def _make_q8_prefill(h_kv: int, h_q: int, d: int, paged: bool, page_size: int = 16, tq: int = 8, tk: int = 32):
    """The ragged (`paged=False`: a chunk against its own k/v) or paged prefill kernel over q8_0 rows."""
    w_n, nb, group = row_width(d), d // QB, h_q // h_kv
    rows = tq * group
    bs = _row_block(rows)
    quant_row = _make_quant_row(d)

    def row(kv: int, pos, hk, k_beg, page_values, p_beg) -> tuple:
        """Index prefix of key position `pos`'s row: a page slot (paged) or a row of the chunk's k / v (ragged)."""
        if paged:
            return (page_values[p_beg + pos // page_size], kv, hk, pos % page_size)
        return (k_beg + pos, hk)

    @T.macro
    def load_tiles(k_tile, v_tile, kt, hk, kbuf, vbuf, k_beg, k_n, page_values, p_beg):
        """Dequantize keys [kt * tk, +tk) into k_tile[d, tk] (transposed) and v_tile[tk, d]; keys past the end
        repeat the last one (masked by the caller)."""
        for j, blk, i in T.grid(tk, nb, QB):
            k_tile[blk * QB + i, j] = _scale(
                kbuf, row(0, T.min(kt * tk + j, k_n - 1), hk, k_beg, page_values, p_beg), d, blk
            ) * kbuf[(*row(0, T.min(kt * tk + j, k_n - 1), hk, k_beg, page_values, p_beg), blk * QB + i)].astype(
                "float32"
            )
        for j, blk in T.grid(tk, nb):
            for i in T.vectorized(QB):
                v_tile[j, blk * QB + i] = _scale(
                    vbuf, row(1, T.min(kt * tk + j, k_n - 1), hk, k_beg, page_values, p_beg), d, blk
                ) * vbuf[(*row(1, T.min(kt * tk + j, k_n - 1), hk, k_beg, page_values, p_beg), blk * QB + i)].astype(
                    "float32"
                )

    @T.macro
    def body(q, q_beg, q_n, k_n, hk, item, n_tiles, causal, sm_scale, lse, output, kbuf, vbuf, k_beg, pv, p_beg):
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
        zz = item // h_kv
        r0 = T.if_then_else(zz % 2 == 0, zz // 2, n_tiles - 1 - zz // 2) * tq
        nq = T.min(tq, q_n - r0)
        k_end = T.if_then_else(causal > 0, T.max(T.min(k_n, k_n - q_n + r0 + nq), 0), k_n)
        scal[3] = sm_scale * _f32(LOG2E)
        for qi, g, blk in T.grid(tq, group, nb):
            for i in T.vectorized(QB):
                q_tile[qi * group + g, blk * QB + i] = (
                    scal[3]
                    * _scale(q, (q_beg + T.min(r0 + qi, q_n - 1), hk * group + g), d, blk)
                    * q[q_beg + T.min(r0 + qi, q_n - 1), hk * group + g, blk * QB + i].astype("float32")
                )
        for r in range(rows):
            m_r[r] = _f32(INIT_M)
            l_r[r] = _f32(1.0)
            for dd in T.vectorized(d):
                o_tile[r, dd] = _f32(0.0)
        for kt in range((k_end + tk - 1) // tk):
            load_tiles(k_tile, v_tile, kt, hk, kbuf, vbuf, k_beg, k_n, pv, p_beg)
            for r in range(rows):
                for j in T.vectorized(tk):
                    s_tile[r, j] = _f32(0.0)
            for rb in range(rows // bs):
                for dd in range(d):
                    for u in T.unroll(bs):
                        for j in T.vectorized(tk):
                            s_tile[rb * bs + u, j] = s_tile[rb * bs + u, j] + q_tile[rb * bs + u, dd] * k_tile[dd, j]
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
                    d,
                    scal,
                    tmp_n,
                    tmp_f,
                )
            for rb in range(rows // bs):
                for j in range(T.min(tk, k_end - kt * tk)):
                    for u in T.unroll(bs):
                        for dd in T.vectorized(d):
                            o_tile[rb * bs + u, dd] = o_tile[rb * bs + u, dd] + s_tile[rb * bs + u, j] * v_tile[j, dd]
        for qi in range(nq):
            for g in range(group):
                scal[3] = _f32(1.0) / l_r[qi * group + g]
                for dd in T.vectorized(d):
                    o_tile[qi * group + g, dd] = o_tile[qi * group + g, dd] * scal[3]
                quant_row(o_tile, qi * group + g, output, q_beg + r0 + qi, hk * group + g, tmp_n)
                lse[q_beg + r0 + qi, hk * group + g] = m_r[qi * group + g] + T.log2(l_r[qi * group + g])

    if not paged:

        @T.prim_func
        def batch_prefill_ragged_kv_q8(
            var_q: T.handle,
            var_q_indptr: T.handle,
            var_k: T.handle,
            var_v: T.handle,
            var_kv_indptr: T.handle,
            var_q_rope_position: T.handle,
            var_k_rope_pos_offset: T.handle,
            var_output: T.handle,
            var_lse: T.handle,
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
            o1 = T.int32()
            o2 = T.int32()
            o3 = T.int32()
            o4 = T.int32()
            q = T.match_buffer(var_q, (qo_len, h_q, w_n), I8)
            q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=o1)
            k = T.match_buffer(var_k, (kv_len, h_kv, w_n), I8)
            v = T.match_buffer(var_v, (kv_len, h_kv, w_n), I8)
            kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=o2)
            T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=o3)
            T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=o4)
            output = T.match_buffer(var_output, (qo_len, h_q, w_n), I8)
            lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")

            for b in range(batch_size):
                q_beg = q_indptr[b]
                q_n = q_indptr[b + 1] - q_beg
                k_beg = kv_indptr[b]
                k_n = kv_indptr[b + 1] - k_beg
                n_tiles = (q_n + tq - 1) // tq

                for item in T.parallel(n_tiles * h_kv):
                    body(
                        q, q_beg, q_n, k_n, item % h_kv, item, n_tiles, causal, sm_scale, lse, output,
                        k, v, k_beg, kv_indptr, 0,
                    )  # fmt: skip

        return batch_prefill_ragged_kv_q8

    @T.prim_func
    def batch_prefill_paged_kv_q8(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_pages: T.handle,
        var_page_indptr: T.handle,
        var_page_values: T.handle,
        var_length_info: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
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
        o1 = T.int32()
        o2 = T.int32()
        o3 = T.int32()
        o4 = T.int32()
        o5 = T.int32()
        o6 = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, w_n), I8)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=o1)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, w_n), I8)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=o2)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=o3)
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=o4)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=o5)
        T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=o6)
        output = T.match_buffer(var_output, (total_len, h_q, w_n), I8)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")

        for b in range(batch_size):
            q_beg = q_indptr[b]
            q_n = q_indptr[b + 1] - q_beg
            p_beg = page_indptr[b]
            k_n = T.if_then_else(
                p_beg != page_indptr[b + 1], (page_indptr[b + 1] - p_beg - 1) * page_size + length_info[b], 0
            )
            n_tiles = (q_n + tq - 1) // tq

            for item in T.parallel(n_tiles * h_kv):
                body(
                    q, q_beg, q_n, k_n, item % h_kv, item, n_tiles, causal, sm_scale, lse, output,
                    pages, pages, 0, page_values, p_beg,
                )  # fmt: skip

    return batch_prefill_paged_kv_q8


def attention_prefill_ragged_q8(h_kv: int, h_q: int, d: int) -> tirx.PrimFunc:
    return _make_q8_prefill(h_kv, h_q, d, paged=False)


def attention_prefill_q8(h_kv: int, h_q: int, d: int, page_size: int = 16) -> tirx.PrimFunc:
    return _make_q8_prefill(h_kv, h_q, d, paged=True, page_size=page_size)


def merge_state_q8(d: int) -> tirx.PrimFunc:
    """`(v, s) <- merge((v, s), (v_other, s_other))` for q8_0 rows `v` (dequantize, merge, quantize)."""
    w_n, nb = row_width(d), d // QB
    quant_row = _make_quant_row(d)

    @T.prim_func
    def merge_state_inplace_q8(v: T.handle, s: T.handle, v_other: T.handle, s_other: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        N = T.int32()
        H = T.int32()
        V = T.match_buffer(v, (N, H, w_n), I8)
        S = T.match_buffer(s, (N, H), "float32")
        V_other = T.match_buffer(v_other, (N, H, w_n), I8)
        S_other = T.match_buffer(s_other, (N, H), "float32")
        for n in T.parallel(N):
            w = T.alloc_local((4,), "float32")
            row = T.alloc_local((1, d), "float32")
            tmp = T.alloc_local((2,), "float32")
            for h in range(H):
                w[0] = T.max(S[n, h], S_other[n, h])
                w[1] = T.exp2(S[n, h] - w[0])
                w[2] = T.exp2(S_other[n, h] - w[0])
                w[3] = w[1] + w[2]
                w[1] = w[1] / w[3]
                w[2] = w[2] / w[3]
                for blk in range(nb):
                    for i in T.vectorized(QB):
                        row[0, blk * QB + i] = (w[1] * _scale(V, (n, h), d, blk)) * V[n, h, blk * QB + i].astype(
                            "float32"
                        ) + (w[2] * _scale(V_other, (n, h), d, blk)) * V_other[n, h, blk * QB + i].astype("float32")
                quant_row(row, 0, V, n, h, tmp)
                S[n, h] = T.log2(w[3]) + w[0]

    return merge_state_inplace_q8


def rope_quantize_q8(h_q: int, h_kv: int, d: int, rope_scaling: dict[str, Any] | None, theta: float):
    """Model side: `qkv[s, H, d]` float32 -> q8_0 rows `[s, H, W]`, q and k heads rotated (rotate-half RoPE at
    `positions[s]`, the cache's query positions) before quantizing, v heads as they are."""
    rope_table = _make_rope_table(_norm_rope_scaling(rope_scaling), d)
    half, w_n, heads = d // 2, row_width(d), h_q + 2 * h_kv
    quant_row = _make_quant_row(d)

    @T.prim_func(check_well_formed=False)  # a root block around hand-written loops
    def rope_quantize_q8(var_qkv: T.handle, var_pos: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # opaque: not fused
        s = T.int32()
        qkv = T.match_buffer(var_qkv, (s, heads, d), "float32")
        positions = T.match_buffer(var_pos, (s,), "int32")
        out = T.match_buffer(var_out, (s, heads, w_n), I8)
        with T.sblock("root"):  # Relax's reshape analysis wants a root block in a call_tir callee
            for t in T.parallel(s):
                cs = T.alloc_local((half,), "float32")
                sn = T.alloc_local((half,), "float32")
                row = T.alloc_local((1, d), "float32")
                tmp = T.alloc_local((2,), "float32")
                rope_table(cs, sn, positions[t], _f32(1.0), _f32(theta))
                for h in range(heads):
                    if h < h_q + h_kv:
                        for i in T.vectorized(half):
                            row[0, i] = cs[i] * qkv[t, h, i] - sn[i] * qkv[t, h, i + half]
                        for i in T.vectorized(half):
                            row[0, i + half] = cs[i] * qkv[t, h, i + half] + sn[i] * qkv[t, h, i]
                    else:
                        for i in T.vectorized(d):
                            row[0, i] = qkv[t, h, i]
                    quant_row(row, 0, out, t, h, tmp)

    return rope_quantize_q8


def dequantize_q8(heads: int, d: int):
    """Model side: q8_0 rows `[s, heads, W]` -> float32 `[s, heads, d]`."""
    w_n, nb = row_width(d), d // QB

    @T.prim_func(check_well_formed=False)  # a root block around hand-written loops
    def dequantize_q8(var_x: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # opaque: not fused
        s = T.int32()
        x = T.match_buffer(var_x, (s, heads, w_n), I8)
        out = T.match_buffer(var_out, (s, heads, d), "float32")
        with T.sblock("root"):
            for t in T.parallel(s):
                for h, blk in T.grid(heads, nb):
                    for i in T.vectorized(QB):
                        out[t, h, blk * QB + i] = _scale(x, (t, h), d, blk) * x[t, h, blk * QB + i].astype("float32")

    return dequantize_q8
