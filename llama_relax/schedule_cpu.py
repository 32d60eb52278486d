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

import tvm
from tvm import relax, te, tirx
from tvm.ir.expr import TensorLoad
from tvm.s_tir import Schedule

from llama_relax.schedule_matmul import (
    _DATA_PAR,
    _SCHED_ERRORS,
    _SCHEDULED_ATTRS,
    GEMV_MAX_M_NN,
    GEMV_MAX_M_NT,
    CpuTiles,
    MatmulInfo,
    _extent,
    _find_matmul,
    _is_dequant,
    _strip_cast,
    _var_indices,
    _written_buffer,
    branch_by_rows,
    match_matmul,
    schedule_gemm,
    schedule_gemv_nn,
    schedule_gemv_nt,
    schedule_qgemv_rows,
)


def cpu_schedule_pass(target: tvm.target.Target) -> tvm.transform.Pass:
    """Module pass: fuse LM-head transposes into NT matmuls, then schedule every recognised matmul PrimFunc."""
    tiles = CpuTiles.for_target(target, _num_cores(target))

    @tvm.transform.module_pass(opt_level=0, name="CPUScheduleMatmul")
    def _pass(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        mod = fuse_transpose_matmul(mod)
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            new_func = schedule_prim_func(func, tiles)
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


def schedule_prim_func(func: tirx.PrimFunc, tiles: CpuTiles | None = None) -> tirx.PrimFunc | None:
    """Schedule one PrimFunc if it is a (fused) matmul; None when it is not recognised."""
    tiles = tiles or CpuTiles()
    try:
        rows, info = _row_count(func)
    except Exception:  # anything unexpected in a foreign function: leave it alone
        return None
    if info is None:
        return None
    gemv = schedule_gemv_nt if info.nt else schedule_gemv_nn
    gemv_max = GEMV_MAX_M_NT if info.nt else GEMV_MAX_M_NN
    # a quantized NN weight: one row dequantizes in registers (GEMV); a few rows share a dequantized tile
    few_rows = schedule_qgemv_rows if _has_dequant(func) and not info.nt else None
    if _has_dequant(func):
        gemv_max = tiles.qgemv_max_m
    try:
        if isinstance(rows, int):
            one = gemv if rows == 1 or few_rows is None else few_rows
            new = one(func, tiles) if rows <= gemv_max else schedule_gemm(func, tiles)
        else:
            small, large = gemv(func, tiles), schedule_gemm(func, tiles)
            if not all(a.same_as(b) for a, b in zip(small.params, large.params, strict=True)):
                return None
            small, large = small.body, large.body
            if few_rows is not None:
                small = branch_by_rows(rows <= 1, gemv(func, tiles), few_rows(func, tiles))
            new = func.with_body(tirx.IfThenElse(rows <= gemv_max, small, large))
    except Exception:  # a schedule step did not apply: keep the original function
        return None
    return new.with_attr("tirx.is_scheduled", True)


def _has_dequant(func: tirx.PrimFunc) -> bool:
    sch = Schedule(func)
    return any(_is_dequant(sch, b) for b in sch.get_child_blocks(sch.get_sblock("root")))


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
