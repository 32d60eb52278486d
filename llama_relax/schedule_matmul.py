"""Matmul schedules for the CPU (x86 AVX2/FMA): pattern matching of matmul blocks (NN and NT, fused
producers/epilogues), the register-blocked GEMM micro-kernel and the streaming GEMV kernels. Used by the
`cpu_schedule_pass` in `schedule_cpu`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.ir.expr import TensorLoad
from tvm.s_tir import Schedule
from tvm.s_tir.stmt import SBlock, SBlockRealize

from llama_relax.quantization import DEQUANT_BLOCK  # the block that rebuilds quantized weights: kept apart

# Row counts up to these run the GEMV kernel instead of the GEMM kernel (float weights).
GEMV_MAX_M_NN = 12
GEMV_MAX_M_NT = 48
GEMV_KU = 8
GEMV_CB = 4096


@dataclass(frozen=True)
class CpuTiles:
    """Register tiles and vector widths of the kernels for one CPU, chosen from its ISA.

    GEMM micro-tile: MR rows x NR columns of fp32 accumulators (AVX2, 16 registers of 8 lanes: 6 x 2 ymm = 12;
    AVX-512, 32 registers of 16 lanes: 12 x 2 zmm = 24), plus the B vectors and an A broadcast. GEMV: `gemv_nv`
    lanes along contiguous output columns (NN), `gemv_nt_kv` lanes along K times `gemv_nt_ju` weight rows (NT).
    A quantized weight's small-M kernel (`schedule_qgemv_rows`) dequantizes each weight tile once for all rows;
    past `qgemv_max_m` rows the GEMM (which dequantizes and packs each panel once) is cheaper. Measured on znver4
    (gate_up 576 x 3072, Q4, one thread), rows kernel / GEMM: 0.33x at M=2, 0.5x at 5 and at 9, 0.74x at 12, 1.0x
    at 16 (the GEMM pays for whole MR-row tiles). AVX2 keeps the earlier, unmeasured, 8."""

    cores: int = 2
    lanes: int = 8
    mr: int = 6
    nr: int = 16
    gemv_nv: int = 16
    gemv_nt_kv: int = 8
    gemv_nt_ju: int = 8
    qgemv_max_m: int = 8
    qgemv_ku: int = 4  # k per weight tile the small-M quantized kernel hoists out of its row loop (registers)

    @classmethod
    def for_target(cls, target: tvm.target.Target | None, cores: int) -> CpuTiles:
        from tvm.target import codegen

        avx512 = target is not None and all(
            codegen.target_has_features(f, target) for f in ("avx512f", "avx512bw", "avx512vl")
        )
        if avx512:
            return cls(
                cores, lanes=16, mr=8, nr=32, gemv_nv=32, gemv_nt_kv=16, gemv_nt_ju=8, qgemv_max_m=16, qgemv_ku=8
            )
        return cls(cores)


_SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled")
# what a failed schedule primitive raises (ScheduleError is a RuntimeError; InternalError for failed checks)
_SCHED_ERRORS = (RuntimeError, ValueError, tvm.error.InternalError)
_DATA_PAR = 0
_COMM_REDUCE = 2


# ----------------------------------------------------------------------------------------------------------
# Pattern matching
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MatmulInfo:
    """What the matmul block computes: which reads are A / B, and which block iters are M, N and K."""

    a_buf: tirx.Buffer
    b_buf: tirx.Buffer
    c_buf: tirx.Buffer
    nt: bool
    m_iters: list[int]
    n_iter: int
    k_iter: int


def _strip_cast(expr):
    while isinstance(expr, tirx.Cast):
        expr = expr.value
    return expr


def _var_indices(indices) -> list | None:
    out = []
    for idx in indices:
        if not isinstance(idx, tirx.Var):
            return None
        out.append(idx)
    return out


def match_matmul(block) -> MatmulInfo | None:
    """Recognise `C[m.., n] = C[m.., n] + A[m.., k] * B[k, n]` (NN) or `... * B[n, k]` (NT)."""
    if block.init is None or len(block.writes) != 1 or len(block.reads) not in (2, 3):
        return None
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tirx.Add):
        return None
    c_idx = _var_indices(store.indices)
    if c_idx is None or len(c_idx) < 2 or len(set(map(id, c_idx))) != len(c_idx):
        return None
    lhs, rhs = store.value.a, store.value.b
    if isinstance(lhs, tirx.Mul):
        lhs, rhs = rhs, lhs
    lhs, prod = _strip_cast(lhs), rhs
    if not isinstance(lhs, TensorLoad) or not lhs.source.same_as(store.buffer):
        return None
    l_idx = _var_indices(lhs.indices)
    if l_idx is None or len(l_idx) != len(c_idx) or any(not u.same_as(v) for u, v in zip(l_idx, c_idx, strict=True)):
        return None
    prod = _strip_cast(prod)
    if not isinstance(prod, tirx.Mul):
        return None
    x, y = _strip_cast(prod.a), _strip_cast(prod.b)
    if not isinstance(x, TensorLoad) or not isinstance(y, TensorLoad):
        return None
    iter_vars = [iv.var for iv in block.iter_vars]
    kinds = [int(iv.iter_type) for iv in block.iter_vars]
    red = [i for i, kind in enumerate(kinds) if kind == _COMM_REDUCE]
    if len(red) != 1 or any(kind not in (_DATA_PAR, _COMM_REDUCE) for kind in kinds):
        return None
    k_var = iter_vars[red[0]]

    def pos(var) -> int:
        for i, v in enumerate(iter_vars):
            if v.same_as(var):
                return i
        return -1

    n_var = c_idx[-1]
    for a, b in ((x, y), (y, x)):
        a_idx, b_idx = _var_indices(a.indices), _var_indices(b.indices)
        if a_idx is None or b_idx is None or len(b_idx) != 2 or len(a_idx) != len(c_idx):
            continue
        if not a_idx[-1].same_as(k_var) or any(not u.same_as(v) for u, v in zip(a_idx[:-1], c_idx[:-1], strict=True)):
            continue
        if b_idx[0].same_as(k_var) and b_idx[1].same_as(n_var):
            nt = False
        elif b_idx[0].same_as(n_var) and b_idx[1].same_as(k_var):
            nt = True
        else:
            continue
        m_iters = [pos(v) for v in c_idx[:-1]]
        n_iter, k_iter = pos(n_var), red[0]
        if min([*m_iters, n_iter]) < 0 or len(block.iter_vars) != len(c_idx) + 1:
            return None
        return MatmulInfo(a.source, b.source, store.buffer, nt, m_iters, n_iter, k_iter)
    return None


def _find_matmul(sch: Schedule):
    """The unique matmul block among the root's children, after inlining its injective producers."""
    root = sch.get_sblock("root")
    found = None
    for blk in sch.get_child_blocks(root):
        if match_matmul(sch.get(blk)) is not None:
            if found is not None:
                return None
            found = blk
    if found is None:
        return None
    _inline_producers(sch, found)
    info = match_matmul(sch.get(found))
    return (found, info) if info is not None else None


def _is_spatial(sch: Schedule, blk) -> bool:
    node = sch.get(blk)
    return node.init is None and all(int(iv.iter_type) == _DATA_PAR for iv in node.iter_vars)


def _is_dequant(sch: Schedule, blk) -> bool:
    return sch.get(blk).name_hint.startswith(DEQUANT_BLOCK)


def _inline_producers(sch: Schedule, blk) -> None:
    """Inline injective producers (casts, transposes) of the matmul inputs where TVM allows it. A weight
    dequantization stays a block of its own: the kernels decide where it runs (per panel, or in registers)."""
    changed = True
    while changed:
        changed = False
        for prod in sch.get_producers(blk):
            if not _is_spatial(sch, prod) or _is_dequant(sch, prod):
                continue
            try:
                sch.compute_inline(prod)
                changed = True
                break
            except _SCHED_ERRORS:
                continue


def _merge_epilogue(sch: Schedule, blk):
    """Collapse the injective consumer chain of `blk` into one block; return it (None if no epilogue).

    Raises ValueError when the consumers are not a single injective chain.
    """
    consumers = sch.get_consumers(blk)
    if not consumers:
        return None
    if len(consumers) != 1 or not _is_spatial(sch, consumers[0]):
        raise ValueError("matmul output has a non-injective or multiple consumers")
    epi = consumers[0]
    while True:
        nxt = sch.get_consumers(epi)
        if not nxt:
            return epi
        if len(nxt) != 1 or not _is_spatial(sch, nxt[0]):
            raise ValueError("epilogue chain is not a single injective chain")
        sch.reverse_compute_inline(nxt[0])


def _extent(sch: Schedule, loop):
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else ext


def _largest_divisor(n, candidates) -> int:
    if not isinstance(n, int):
        return 1
    for c in candidates:
        if n % c == 0:
            return c
    return 1


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


def _matmul_loops(sch: Schedule, blk, info: MatmulInfo):
    loops = sch.get_loops(blk)
    if len(loops) != len(sch.get(blk).iter_vars):
        raise ValueError("matmul block is not a perfect loop nest")
    m_loops = [loops[i] for i in info.m_iters]
    m = sch.fuse(*m_loops) if len(m_loops) > 1 else m_loops[0]
    return m, loops[info.n_iter], loops[info.k_iter]


def _vectorize_tail(sch: Schedule, blk, width: int) -> None:
    """Vectorize the innermost loop of `blk` (split by `width` if longer and divisible)."""
    loop = sch.get_loops(blk)[-1]
    ext = _extent(sch, loop)
    if not isinstance(ext, int) or ext <= 1:
        return
    if ext > width and ext % width == 0:
        _, loop = sch.split(loop, [None, width])
    elif ext > width:
        return
    sch.vectorize(loop)


def _open_matmul(func: tirx.PrimFunc):
    """A schedule of `func` with its matmul block found and its epilogue merged: (sch, block, info, epilogue)."""
    sch = Schedule(func)
    found = _find_matmul(sch)
    if found is None:
        raise ValueError("no matmul block")
    blk, info = found
    return sch, blk, info, _merge_epilogue(sch, blk)


def schedule_gemm(func: tirx.PrimFunc, tiles: CpuTiles) -> tirx.PrimFunc:
    """Register-blocked GEMM: M padded to MR, packed A panels, packed per-panel weights, MR x NR accumulators.
    A quantized weight's `dequantize` block is inlined into the panel pack: each panel is dequantized once, into
    the packed fp32 tile, and reused by every row tile."""
    mr = tiles.mr
    sch, blk, info, epi = _open_matmul(func)

    node = sch.get(blk)
    n_ext = node.iter_vars[info.n_iter].dom.extent
    if not isinstance(n_ext, tirx.IntImm):
        raise ValueError("symbolic N")
    n_ext = int(n_ext)
    nr = next((c for c in (tiles.nr, tiles.nr // 2, 8) if n_ext % c == 0), tiles.nr)
    padding = [1] * len(node.iter_vars)
    m_last = info.m_iters[-1]
    for i in reversed(info.m_iters):
        ext = node.iter_vars[i].dom.extent
        if not (isinstance(ext, tirx.IntImm) and int(ext) == 1):
            m_last = i
            break
    padding[m_last] = mr
    padding[info.n_iter] = nr
    sch.pad_einsum(blk, padding)

    # A: pack into [Mp / mr, K, mr] (inlining the padding block), computed once for the whole call.
    a_read = _read_index(sch, blk, "a")
    a_pack = sch.cache_read(blk, a_read, "global")
    for prod in sch.get_producers(a_pack):
        sch.compute_inline(prod)
    # B: packed per column panel below (the padding block, if any, is inlined into the pack).
    b_read = _read_index(sch, blk, "b")
    b_pack = sch.cache_read(blk, b_read, "global")
    for prod in sch.get_producers(b_pack):  # a quantized weight's dequantize too: it runs in the pack, per panel
        sch.compute_inline(prod)

    # C: the padded output is the register tile; its write-back (with the epilogue) runs per tile.
    consumers = sch.get_consumers(blk)
    if consumers:
        wb = consumers[0]
        if epi is not None and not sch.get(wb).same_as(sch.get(epi)):
            sch.reverse_compute_inline(epi)
        sch.set_scope(blk, 0, "local")
    else:
        wb = sch.cache_write(blk, 0, "local")
        if epi is not None:
            sch.reverse_compute_inline(epi)

    m, n, k = _matmul_loops(sch, blk, info)
    mo, mi = sch.split(m, [None, mr])
    no, ni = sch.split(n, [None, nr])
    sch.reorder(no, mo, k, mi, ni)
    sch.parallel(no)
    sch.reverse_compute_at(wb, mo)
    _vectorize_tail(sch, wb, nr)

    if info.nt:
        sch.transform_layout(b_pack, ("write", 0), lambda j, kk: (kk, j))
    sch.compute_at(b_pack, no)
    _vectorize_tail(sch, b_pack, nr)

    a_rank = len(sch.get(a_pack).iter_vars)
    m_dims = info.m_iters

    def a_map(*idx):
        # fused row index over the M dims, then [row // mr, k, row % mr]
        row = idx[m_dims[0]]
        for d in m_dims[1:]:
            row = row * a_shape[d] + idx[d]
        return (row // mr, idx[a_rank - 1], row % mr)

    a_shape = list(_written_buffer(sch, a_pack).shape)
    sch.transform_layout(a_pack, ("write", 0), a_map)
    a_loops = sch.get_loops(a_pack)
    sch.parallel(sch.fuse(*a_loops[:-1]) if len(a_loops) > 2 else a_loops[0])

    sch.unroll(mi)
    sch.vectorize(ni)
    sch.decompose_reduction(blk, k)
    return sch.mod["main"]


def _written_buffer(sch: Schedule, blk):
    return sch.get(blk).writes[0].source


def _read_index(sch: Schedule, blk, which: str) -> int:
    """Index among the block's reads of operand A or B (re-matched after padding renamed the buffers)."""
    node = sch.get(blk)
    info = match_matmul(node)
    if info is None:
        raise ValueError("matmul pattern lost")
    buf = info.a_buf if which == "a" else info.b_buf
    for i, region in enumerate(node.reads):
        if region.source.same_as(buf):
            return i
    raise ValueError(f"operand {which} not among the reads")


def schedule_gemv_nn(func: tirx.PrimFunc, tiles: CpuTiles, rows_inside: bool = False) -> tirx.PrimFunc:
    """Small-M NN kernel: each task owns a contiguous column block and streams its weight rows once. With
    `rows_inside` (`schedule_qgemv_rows`) the row loop runs inside the k tile instead of around the column groups."""
    sch, blk, info, epi = _open_matmul(func)
    m, n, k = _matmul_loops(sch, blk, info)
    n_ext, k_ext = _extent(sch, n), _extent(sch, k)
    num_cores = tiles.cores
    nv = _largest_divisor(n_ext, (tiles.gemv_nv, 16, 8, 4, 2))
    ku = _largest_divisor(k_ext, (tiles.qgemv_ku, 4, 2) if rows_inside else (GEMV_KU, 2))
    groups = n_ext // nv
    tasks = max(num_cores, math.ceil(n_ext / GEMV_CB))
    tasks = math.ceil(tasks / num_cores) * num_cores
    per = math.ceil(groups / tasks)
    nb, ng, nvl = sch.split(n, [None, per, nv])
    ko, ki = sch.split(k, [None, ku])
    if rows_inside:
        _, m = sch.split(m, [1, None])  # a loop variable of its own: the GEMV branch keeps a lone M loop's original
        sch.reorder(nb, ko, ng, m, ki, nvl)
    else:
        sch.reorder(nb, ko, m, ng, ki, nvl)
    sch.parallel(nb)
    sch.unroll(ki)
    sch.vectorize(nvl)
    sch.decompose_reduction(blk, ko)
    if epi is not None:
        sch.reverse_compute_at(epi, nb)
        _vectorize_tail(sch, epi, nv)
    _inline_dequant(sch)
    return sch.mod["main"]


def _inline_dequant(sch: Schedule) -> None:
    """GEMV: dequantize each weight element where it is used (in registers, next to its multiply-add)."""
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        if _is_dequant(sch, blk):
            sch.compute_inline(blk)


def schedule_gemv_nt(func: tirx.PrimFunc, tiles: CpuTiles) -> tirx.PrimFunc:
    """Small-M NT kernel (LM head): dot products along contiguous K, JU weight rows at a time."""
    sch, blk, info, epi = _open_matmul(func)
    m, n, k = _matmul_loops(sch, blk, info)
    n_ext, k_ext = _extent(sch, n), _extent(sch, k)
    kv = _largest_divisor(k_ext, (tiles.gemv_nt_kv, 8, 4))
    ju = _largest_divisor(n_ext, (tiles.gemv_nt_ju, 4, 2))
    no, ji = sch.split(n, [None, ju])
    if kv > 1:
        ko, kvl = sch.split(k, [None, kv])
        sch.reorder(no, m, ko, ji, kvl)
        rf = sch.rfactor(kvl, factor_axis=len(sch.get(blk).writes[0].region))
        final = blk
        # rf block: loops (no, m, ko, ji, kvl); accumulate kv lanes in registers, reduce after ko.
        rf_loops = sch.get_loops(rf)
        sch.parallel(rf_loops[0])
        sch.unroll(rf_loops[3])
        sch.vectorize(rf_loops[4])
        sch.set_scope(rf, 0, "local")
        sch.reverse_compute_at(final, rf_loops[1])
        # lane sums accumulate in a register, not through the output in memory
        final_wb = sch.cache_write(final, 0, "local")
        sch.reverse_compute_at(final_wb, rf_loops[1])
        sch.decompose_reduction(rf, rf_loops[2])
        if epi is not None:
            sch.reverse_compute_at(epi, rf_loops[1])
    else:
        sch.reorder(no, m, k, ji)
        sch.parallel(no)
        sch.decompose_reduction(blk, k)
        if epi is not None:
            sch.reverse_compute_at(epi, m)
    _inline_dequant(sch)
    return sch.mod["main"]


def schedule_qgemv_rows(func: tirx.PrimFunc, tiles: CpuTiles) -> tirx.PrimFunc:
    """Small-M NN kernel for a quantized weight: the GEMV with the rows inside the k tile, so the weight tile's
    dequantization (inlined, in registers) does not depend on the row and the compiler hoists it out of the row
    loop: the unpack is paid once per step, not once per row (a verify forward of a few tokens per sequence)."""
    return schedule_gemv_nn(func, tiles, rows_inside=True)


def branch_by_rows(cond, a: tirx.PrimFunc, b: tirx.PrimFunc) -> tirx.Stmt:
    """One body running schedule `a` of a function where `cond` holds, else schedule `b`: their root blocks
    merge into one that allocates their buffers once (both schedules keep the function's own intermediates)."""
    ra, rb = a.body.block, b.body.block
    allocs = list(ra.alloc_buffers) + [
        buf for buf in rb.alloc_buffers if not any(buf.same_as(x) for x in ra.alloc_buffers)
    ]
    root = SBlock(
        ra.iter_vars, ra.reads, ra.writes, ra.name_hint, tirx.IfThenElse(cond, ra.body, rb.body),
        alloc_buffers=allocs, annotations=ra.annotations,
    )  # fmt: skip
    return SBlockRealize(a.body.iter_values, a.body.predicate, root)
