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

from typing import Any

import tvm
from tvm import DataType, tirx
from tvm.script import tirx as T

from llama_relax.kernels.attention_common import (
    INIT_M,
    LOG2E,
    _chunk_len,
    _declare_length_info,
    _f32,
    _make_rope_table,
    _norm_rope_scaling,
    _online_softmax_tile,
    _prefetch_row,
    _seq_offset,
)
from llama_relax.kernels.attention_prefill import attention_prefill_cpu, attention_prefill_ragged_cpu

__all__ = [
    "attention_decode_cpu",
    "attention_prefill_cpu",
    "attention_prefill_ragged_cpu",
    "cpu_attention_kernels",
    "merge_state_inplace_cpu",
]


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
    lanes = 8  # partial sums per q head, reduced by halving
    assert dd_n % lanes == 0, "decode kernel: head_dim must be a multiple of 8"
    n_chunks = dd_n // lanes
    line_elems = 64 // DataType(qkv_dtype).itemsize  # elements per 64-byte cache line
    row_lines = -(-dd_n // line_elems)

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
            nxt = T.alloc_local((tk,), "int32")
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
                for j in range(tk):  # software prefetch of the next tile's K and V rows
                    nxt[j] = _seq_offset(T.min((kt + 1) * tk + j, k_n - 1), b, length_info, sliding_window)
                    _prefetch_row(
                        pages,
                        page_table_values[p_beg + nxt[j] // page_size],
                        hk,
                        nxt[j] % page_size,
                        row_lines,
                        line_elems,
                        dd_n,
                    )
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
                    for g in range(group):
                        for ln in T.vectorized(lanes):
                            part[g, ln] = _f32(0.0)
                    if rotary_mode == 1:
                        for c in T.unroll(n_chunks):
                            for g in T.unroll(group):
                                for ln in T.vectorized(lanes):
                                    part[g, ln] = part[g, ln] + q_tile[g, c * lanes + ln] * k_row[c * lanes + ln]
                    else:  # straight from the page, converted in registers
                        for c in T.unroll(n_chunks):
                            for g in T.unroll(group):
                                for ln in T.vectorized(lanes):
                                    part[g, ln] = part[g, ln] + q_tile[g, c * lanes + ln] * pages[
                                        page[j], 0, hk, slot[j], c * lanes + ln
                                    ].astype("float32")
                    for g in T.unroll(group):  # lanes -> 1 by halving (short dependency chains)
                        if lanes == 16:
                            for ln in T.vectorized(8):
                                part[g, ln] = part[g, ln] + part[g, ln + 8]
                        for ln in T.vectorized(4):
                            part[g, ln] = part[g, ln] + part[g, ln + 4]
                        for ln in T.vectorized(2):
                            part[g, ln] = part[g, ln] + part[g, ln + 2]
                        s_tile[g, j] = part[g, 0] + part[g, 1]
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
