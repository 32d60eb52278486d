"""CPU schedules for the Relax LLM pipeline (x86 AVX2/FMA, a few cores).

`cpu_schedule_pass(target)` is a module pass meant to run right after the stock CPU legalize passes
(LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR) and before the dataflow-lowering passes.
It does three things:

1. Relax level: `call_tir(transpose, (W,))` feeding the weight operand of a plain matmul call (the LM head
   `matmul(h, permute_dims(embed))`) is replaced by one call to a new "NT" matmul PrimFunc that reads the
   [N, K] weight directly, so the 100+ MB embedding is never transposed at run time.
2. TIR level: every PrimFunc whose main block is a matmul `C[m.., n] += A[m.., k] * B[k, n]` (NN) or
   `B[n, k]` (NT), optionally with injective producers (inlined) and an injective epilogue such as a residual
   add (inlined into the register-tile write-back), gets a register-blocked schedule. The row count M is
   usually symbolic, so the function branches at run time: small M runs a streaming GEMV kernel (weights
   read once, contiguous per thread), larger M runs a GEMM kernel (M padded to the micro-tile, A packed
   into MR-interleaved panels, a K x NR weight panel packed per column block, MR x NR accumulators in
   registers, parallel over column panels).
3. Fused elementwise math (split + silu + multiply) is inlined into one parallel, vectorized loop nest.
   Pure data movement (reshape, take, transpose), reductions (rms_norm, softmax) and kernels whose
   `op_pattern` is opaque (KV cache, attention) are not touched.

Run-time threads: TVM sizes its pool as hardware_concurrency / 2 on x86, i.e. ONE thread on a 2-vCPU VM,
unless TVM_NUM_THREADS is set before the first parallel kernel runs.

PrimFuncs that do not match, or that carry `tirx.is_scheduled`, are left untouched; any schedule error
leaves the original function in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import relax, te, tirx
from tvm.ir.expr import TensorLoad
from tvm.s_tir import Schedule

# GEMM micro-tile: MR rows x NR columns of fp32 accumulators (6 x 2 ymm = 12 registers).
MR = 6
NR = 16
# GEMV kernels: vector width along the contiguous dimension, k unroll, column block per task.
GEMV_NV = 16
GEMV_KU = 8
GEMV_CB = 4096
# Row counts up to these run the GEMV kernel instead of the GEMM kernel.
GEMV_MAX_M_NN = 12
GEMV_MAX_M_NT = 48
# NT GEMV: weight rows processed together (one accumulator register each) and lanes per accumulator.
GEMV_NT_JU = 8
GEMV_NT_KV = 8

_SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled")
# what a failed schedule primitive raises (ScheduleError is a RuntimeError; InternalError for failed checks)
_SCHED_ERRORS = (RuntimeError, ValueError, tvm.error.InternalError)
_DATA_PAR = 0
_COMM_REDUCE = 2


def cpu_schedule_pass(target: tvm.target.Target) -> tvm.transform.Pass:
    """Module pass: fuse LM-head transposes into NT matmuls, then schedule every recognised matmul PrimFunc."""
    num_cores = _num_cores(target)

    @tvm.transform.module_pass(opt_level=0, name="CPUScheduleMatmul")
    def _pass(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        mod = fuse_transpose_matmul(mod)
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            new_func = schedule_prim_func(func, num_cores)
            if new_func is None:
                new_func = _try_elementwise(func)
            if new_func is not None:
                updates[gv] = new_func
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def _num_cores(target: tvm.target.Target) -> int:
    cores = target.attrs.get("num-cores") if target is not None else None
    return max(1, int(cores)) if cores else 2


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    attrs = func.attrs
    return attrs is not None and any(key in attrs and bool(attrs[key]) for key in _SCHEDULED_ATTRS)


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


def _inline_producers(sch: Schedule, blk) -> None:
    """Inline injective producers (casts, transposes) of the matmul inputs where TVM allows it."""
    changed = True
    while changed:
        changed = False
        for prod in sch.get_producers(blk):
            if not _is_spatial(sch, prod):
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


def schedule_gemm(func: tirx.PrimFunc, num_cores: int) -> tirx.PrimFunc:
    """Register-blocked GEMM: M padded to MR, packed A panels, packed per-panel weights, MR x NR accumulators."""
    sch = Schedule(func)
    found = _find_matmul(sch)
    if found is None:
        raise ValueError("no matmul block")
    blk, info = found
    epi = _merge_epilogue(sch, blk)

    node = sch.get(blk)
    n_ext = node.iter_vars[info.n_iter].dom.extent
    if not isinstance(n_ext, tirx.IntImm):
        raise ValueError("symbolic N")
    n_ext = int(n_ext)
    nr = NR if n_ext % NR == 0 else (8 if n_ext % 8 == 0 else NR)
    padding = [1] * len(node.iter_vars)
    m_last = info.m_iters[-1]
    for i in reversed(info.m_iters):
        ext = node.iter_vars[i].dom.extent
        if not (isinstance(ext, tirx.IntImm) and int(ext) == 1):
            m_last = i
            break
    padding[m_last] = MR
    padding[info.n_iter] = nr
    sch.pad_einsum(blk, padding)

    # A: pack into [Mp / MR, K, MR] (inlining the padding block), computed once for the whole call.
    a_read = _read_index(sch, blk, "a")
    a_pack = sch.cache_read(blk, a_read, "global")
    for prod in sch.get_producers(a_pack):
        sch.compute_inline(prod)
    # B: packed per column panel below (the padding block, if any, is inlined into the pack).
    b_read = _read_index(sch, blk, "b")
    b_pack = sch.cache_read(blk, b_read, "global")
    for prod in sch.get_producers(b_pack):
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
    mo, mi = sch.split(m, [None, MR])
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
        # fused row index over the M dims, then [row // MR, k, row % MR]
        row = idx[m_dims[0]]
        for d in m_dims[1:]:
            row = row * a_shape[d] + idx[d]
        return (row // MR, idx[a_rank - 1], row % MR)

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


def schedule_gemv_nn(func: tirx.PrimFunc, num_cores: int) -> tirx.PrimFunc:
    """Small-M NN kernel: each task owns a contiguous column block and streams its weight rows once."""
    sch = Schedule(func)
    found = _find_matmul(sch)
    if found is None:
        raise ValueError("no matmul block")
    blk, info = found
    epi = _merge_epilogue(sch, blk)
    m, n, k = _matmul_loops(sch, blk, info)
    n_ext, k_ext = _extent(sch, n), _extent(sch, k)
    nv = _largest_divisor(n_ext, (GEMV_NV, 8, 4, 2))
    ku = _largest_divisor(k_ext, (GEMV_KU, 2))
    groups = n_ext // nv
    tasks = max(num_cores, math.ceil(n_ext / GEMV_CB))
    tasks = math.ceil(tasks / num_cores) * num_cores
    per = math.ceil(groups / tasks)
    nb, ng, nvl = sch.split(n, [None, per, nv])
    ko, ki = sch.split(k, [None, ku])
    sch.reorder(nb, ko, m, ng, ki, nvl)
    sch.parallel(nb)
    sch.unroll(ki)
    sch.vectorize(nvl)
    sch.decompose_reduction(blk, ko)
    if epi is not None:
        sch.reverse_compute_at(epi, nb)
        _vectorize_tail(sch, epi, nv)
    return sch.mod["main"]


def schedule_gemv_nt(func: tirx.PrimFunc, num_cores: int) -> tirx.PrimFunc:
    """Small-M NT kernel (LM head): dot products along contiguous K, JU weight rows at a time."""
    sch = Schedule(func)
    found = _find_matmul(sch)
    if found is None:
        raise ValueError("no matmul block")
    blk, info = found
    epi = _merge_epilogue(sch, blk)
    m, n, k = _matmul_loops(sch, blk, info)
    n_ext, k_ext = _extent(sch, n), _extent(sch, k)
    kv = _largest_divisor(k_ext, (GEMV_NT_KV, 4))
    ju = _largest_divisor(n_ext, (GEMV_NT_JU, 4, 2))
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
    return sch.mod["main"]


def _is_plain_elementwise_block(sch: Schedule, blk) -> bool:
    """One store to `out[iter vars]` under a perfect loop nest, nothing else inside the block."""
    node = sch.get(blk)
    if node.init is not None or node.alloc_buffers or node.match_buffers or not node.iter_vars:
        return False
    if any(int(iv.iter_type) != _DATA_PAR for iv in node.iter_vars):
        return False
    store = node.body
    if not isinstance(store, tirx.BufferStore):
        return False
    idx = _var_indices(store.indices)
    iters = [iv.var for iv in node.iter_vars]
    if idx is None or len(idx) != len(iters) or any(not a.same_as(b) for a, b in zip(idx, iters, strict=True)):
        return False
    return len(sch.get_loops(blk)) == len(iters)


def _is_data_movement(sch: Schedule, blk) -> bool:
    return isinstance(_strip_cast(sch.get(blk).body.value), TensorLoad)


def schedule_elementwise(func: tirx.PrimFunc, vector_lanes: int = 8) -> tirx.PrimFunc | None:
    """Fused elementwise math (e.g. split + silu + multiply): inline into the output, parallel rows, vector inner.

    Only plain elementwise loop nests that compute something qualify: pure data movement (reshape, squeeze,
    take, transpose) is left to Relax (RewriteDataflowReshape needs to recognise reshapes), and kernels with
    `op_pattern` above injective (KV-cache and attention kernels) are never touched.
    """
    pattern = func.attrs.get("op_pattern") if func.attrs is not None else None
    if pattern is not None and int(pattern) > 2:
        return None
    sch = Schedule(func)
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    if not blocks or not all(_is_plain_elementwise_block(sch, b) for b in blocks):
        return None
    if all(_is_data_movement(sch, b) for b in blocks):
        return None
    params = {p.name for p in func.params}
    changed = True
    while changed:
        changed = False
        for blk in sch.get_child_blocks(root):
            if _written_buffer(sch, blk).name in params:
                continue
            try:
                sch.compute_inline(blk)
                changed = True
                break
            except _SCHED_ERRORS:
                continue
    for blk in sch.get_child_blocks(root):
        loops = sch.get_loops(blk)
        if not loops:
            continue
        inner = loops[-1]
        ext = _extent(sch, inner)
        vec = None
        if isinstance(ext, int) and ext % vector_lanes == 0 and ext >= vector_lanes:
            outer, vec = sch.split(inner, [None, vector_lanes])
            loops = [*loops[:-1], outer]
        rows = loops[:-1] if len(loops) > 1 else loops
        fused = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        sch.parallel(fused)
        if vec is not None:
            sch.vectorize(vec)
    return sch.mod["main"]


def _try_elementwise(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    try:
        new = schedule_elementwise(func)
    except Exception:  # not a plain loop nest of blocks: leave it alone
        return None
    return None if new is None else new.with_attr("tirx.is_scheduled", True)


def _row_count(func: tirx.PrimFunc):
    """Product of the matmul's M extents (PrimExpr, or int when static)."""
    sch = Schedule(func)
    found = _find_matmul(sch)
    if found is None:
        return None, None
    blk, info = found
    node = sch.get(blk)
    rows = 1
    for i in info.m_iters:
        ext = node.iter_vars[i].dom.extent
        rows = rows * (int(ext) if isinstance(ext, tirx.IntImm) else ext)
    return rows, info


def schedule_prim_func(func: tirx.PrimFunc, num_cores: int = 2) -> tirx.PrimFunc | None:
    """Schedule one PrimFunc if it is a (fused) matmul; None when it is not recognised."""
    try:
        rows, info = _row_count(func)
    except Exception:  # anything unexpected in a foreign function: leave it alone
        return None
    if info is None:
        return None
    gemv = schedule_gemv_nt if info.nt else schedule_gemv_nn
    gemv_max = GEMV_MAX_M_NT if info.nt else GEMV_MAX_M_NN
    try:
        if isinstance(rows, int):
            new = gemv(func, num_cores) if rows <= gemv_max else schedule_gemm(func, num_cores)
        else:
            small = gemv(func, num_cores)
            large = schedule_gemm(func, num_cores)
            if not all(a.same_as(b) for a, b in zip(small.params, large.params, strict=True)):
                return None
            new = func.with_body(tirx.IfThenElse(rows <= gemv_max, small.body, large.body))
    except Exception:  # a schedule step did not apply: keep the original function
        return None
    return new.with_attr("tirx.is_scheduled", True)


# ----------------------------------------------------------------------------------------------------------
# Relax level: transpose + matmul -> NT matmul
# ----------------------------------------------------------------------------------------------------------


def _is_transpose_2d(func: tirx.PrimFunc) -> bool:
    """A PrimFunc with one spatial block `Out[i, j] = In[j, i]`."""
    if not isinstance(func, tirx.PrimFunc) or len(func.params) != 2:
        return False
    try:
        sch = Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except _SCHED_ERRORS:
        return False
    if len(blocks) != 1:
        return False
    node = sch.get(blocks[0])
    store = node.body
    if node.init is not None or not isinstance(store, tirx.BufferStore):
        return False
    load = store.value
    if not isinstance(load, TensorLoad) or len(store.indices) != 2 or len(load.indices) != 2:
        return False
    si, li = _var_indices(store.indices), _var_indices(load.indices)
    return si is not None and li is not None and si[0].same_as(li[1]) and si[1].same_as(li[0])


def _plain_nn_matmul(func: tirx.PrimFunc) -> MatmulInfo | None:
    """Info when `func` is exactly one NN matmul block over its (A, B, C) params."""
    if not isinstance(func, tirx.PrimFunc) or len(func.params) != 3:
        return None
    try:
        sch = Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except _SCHED_ERRORS:
        return None
    if len(blocks) != 1:
        return None
    info = match_matmul(sch.get(blocks[0]))
    if info is None or info.nt:
        return None
    a, b, c = func.params
    if not (a.same_as(info.a_buf) and b.same_as(info.b_buf) and c.same_as(info.c_buf)):
        return None
    return info


def make_nt_matmul(a_shape, a_dtype: str, n: int, k: int, w_dtype: str, out_dtype: str) -> tirx.PrimFunc:
    """`C[..., j] = sum_k A[..., k] * W[j, k]` as a PrimFunc (A of `a_shape`, W of [n, k])."""
    a = te.placeholder(a_shape, a_dtype, name="A")
    w = te.placeholder((tirx.IntImm("int64", n), tirx.IntImm("int64", k)), w_dtype, name="W")
    r = te.reduce_axis((0, tirx.IntImm("int64", k)), name="k")

    def body(*idx):
        x = a[(*idx[:-1], r)]
        y = w[idx[-1], r]
        if x.dtype != out_dtype:
            x = x.astype(out_dtype)
        if y.dtype != out_dtype:
            y = y.astype(out_dtype)
        return te.sum(x * y, axis=r)

    out_shape = [*a_shape[:-1], tirx.IntImm("int64", n)]
    c = te.compute(out_shape, body, name="matmul")
    return te.create_prim_func([a, w, c]).with_attr("tirx.noalias", True).without_attr("global_symbol")


@relax.expr_functor.mutator
class _TransposeMatmulFuser(relax.PyExprMutator):
    """Rewrite call_tir(matmul, (x, call_tir(transpose, (w,)))) into call_tir(matmul_nt, (x, w))."""

    def __init__(self, mod: tvm.ir.IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self.transposes = set()
        self.matmuls = {}
        for gv, func in mod.functions_items():
            if _is_transpose_2d(func):
                self.transposes.add(gv.name_hint)
            else:
                info = _plain_nn_matmul(func)
                if info is not None:
                    self.matmuls[gv.name_hint] = (func, info)
        self.nt_funcs = {}
        self.changed = False
        self.call_tir = tvm.ir.Op.get("relax.call_tir")

    def _callee(self, call) -> str | None:
        if not isinstance(call, relax.Call) or not call.op.same_as(self.call_tir):
            return None
        gv = call.args[0]
        return gv.name_hint if isinstance(gv, tvm.ir.GlobalVar) else None

    def visit_call_(self, op: relax.Call) -> relax.Expr:
        call = super().visit_call_(op)
        name = self._callee(call)
        if name is None or name not in self.matmuls or len(call.args) != 2:
            return call
        args = call.args[1]
        if not isinstance(args, relax.Tuple) or len(args.fields) != 2:
            return call
        x, bt = args.fields
        if not isinstance(bt, relax.Var):
            return call
        bound = self.lookup_binding(bt)
        if bound is None or self._callee(bound) not in self.transposes or len(bound.args) != 2:
            return call
        t_args = bound.args[1]
        if not isinstance(t_args, relax.Tuple) or len(t_args.fields) != 1:
            return call
        w = t_args.fields[0]
        _, info = self.matmuls[name]
        a_buf, b_buf, c_buf = info.a_buf, info.b_buf, info.c_buf
        k_ext, n_ext = b_buf.shape
        if not isinstance(k_ext, tirx.IntImm) or not isinstance(n_ext, tirx.IntImm):
            return call
        key = name
        if key not in self.nt_funcs:
            nt = make_nt_matmul(list(a_buf.shape), a_buf.dtype, int(n_ext), int(k_ext), b_buf.dtype, c_buf.dtype)
            self.nt_funcs[key] = self.builder_.add_func(nt, f"{name}_nt")
        self.changed = True
        return relax.call_tir(self.nt_funcs[key], relax.Tuple([x, w]), list(call.ty_args))

    def run(self) -> tvm.ir.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                new_func = self.visit_expr(func)
                if not new_func.same_as(func):
                    new_func = relax.analysis.remove_all_unused(new_func)
                    self.builder_.update_func(gv, new_func)
        return self.builder_.get()


def fuse_transpose_matmul(mod: tvm.ir.IRModule) -> tvm.ir.IRModule:
    """Replace transpose(W) -> matmul call pairs with one NT matmul call reading W directly.

    The transpose / NN matmul PrimFuncs this leaves without callers are dropped from the module.
    """
    fuser = _TransposeMatmulFuser(mod)
    if not fuser.matmuls or not fuser.transposes:
        return mod
    new_mod = fuser.run()
    if not fuser.changed:
        return mod
    orphaned = _called_prim_funcs(mod) - _called_prim_funcs(new_mod)
    keep = {
        gv: func
        for gv, func in new_mod.functions_items()
        if not (gv.name_hint in orphaned and isinstance(func, tirx.PrimFunc) and "global_symbol" not in func.attrs)
    }
    return tvm.ir.IRModule(keep, attrs=new_mod.attrs, global_infos=new_mod.global_infos)


def _called_prim_funcs(mod: tvm.ir.IRModule) -> set[str]:
    names = set()
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            names |= {gv.name_hint for gv in relax.analysis.all_global_vars(func)}
    return names
