"""Prefill attention kernels for the paged KV cache on CPU: ragged (a fresh chunk attending to itself) and
paged (a chunk against the pages already in the cache). Conventions: see `attention_cpu`."""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.script import tirx as T

from llama_relax.kernels.attention_common import (
    LOG2E,
    _chunk_len,
    _declare_length_info,
    _f32,
    _make_q_tile_start,
    _make_rope_table,
    _norm_rope_scaling,
    _online_softmax_tile,
    _row_block,
    _seq_offset,
)


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
    q_tile_start = _make_q_tile_start(rope_table, tq, group, d_qk, d_v, dtype)
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
                q_tile_start(
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
                )

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
    q_tile_start = _make_q_tile_start(rope_table, tq, group, d, d, dtype)
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
                q_tile_start(
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
                )

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
