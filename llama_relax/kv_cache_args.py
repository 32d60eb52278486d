"""Re-creating the model's paged KV cache from Python, with its page tensors reachable.

The model's `create_paged_kv_cache` calls `vm.builtin.paged_attention_kv_cache_create` with ~28 arguments (cache
shape, head counts, rope settings and the model library's attention/append/copy kernels). At compile time
`extract_create_args` records that argument list from the Relax IR into a JSON-able spec; at run time
`create_kv_cache` rebuilds the identical call with the library's own kernels, except that `f_debug_get_kv` is
wrapped by a recorder. One `debug_get_kv` over a dummy one-token sequence then hands us every layer's page tensor
(`[num_pages, 2, kv_heads, page_size, head_dim]`), which KV export/import (kvtransfer) reads and writes.

Ownership: the cache owns the pages; the runtime's `kv_pages` holds references that must be dropped with the cache.
The recorder holds no reference to the cache (a cycle through the C++ object would leak it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.runtime import ShapeTuple

CREATE_BUILTIN = "vm.builtin.paged_attention_kv_cache_create"
DEBUG_GET_KV_INDEX = 26  # position of f_debug_get_kv in the builtin's argument list (TVM 0.27)
SYMBOLS = ("max_batch_size", "max_total_seq_len", "prefill_chunk_size", "page_size", "support_sliding_window")


def extract_create_args(mod: tvm.IRModule) -> list[Any]:
    """JSON-able description of the `paged_attention_kv_cache_create` call in `create_paged_kv_cache`."""
    func = mod["create_paged_kv_cache"]
    bindings: dict[relax.Var, relax.Expr] = {}
    call: relax.Call | None = None
    for block in func.body.blocks:
        for b in block.bindings:
            bindings[b.var] = b.value
            v = b.value
            is_packed = isinstance(v, relax.Call) and v.args and isinstance(v.args[0], relax.ExternFunc)
            if is_packed and v.args[0].global_symbol == CREATE_BUILTIN:
                call = v
    if call is None:
        raise RuntimeError("create_paged_kv_cache does not call " + CREATE_BUILTIN)

    def enc(e: Any) -> Any:
        if isinstance(e, relax.Var) and e in bindings:
            v = bindings[e]
            if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.zeros":
                return {"zeros": str(v.attrs.dtype)}
            raise RuntimeError(f"unsupported binding in kv cache args: {v}")
        if isinstance(e, relax.ShapeExpr):
            return {"shape": [int(x) if isinstance(x, tvm.tirx.IntImm) else str(x.name) for x in e.values]}
        kind = type(e).__name__
        if kind == "FloatImm":
            return {"float": float(e.value)}
        if kind == "IntImm":
            return {"bool": bool(e.value)} if str(e.ty) == "bool" else {"int": int(e.value)}
        if kind == "StringImm":
            return {"str": str(e.value)}
        if isinstance(e, relax.GlobalVar):
            return {"func": e.name_hint}
        if isinstance(e, relax.Tuple):
            return {"tuple": [enc(f) for f in e.fields]}
        raise RuntimeError(f"unsupported kv cache argument {type(e).__name__}: {e}")

    return [enc(a) for a in call.args[1:]]


class _Recorder:
    """Wraps the library's debug_get_kv kernel; remembers the `pages` argument per layer.

    With `positions_only` set, a call copies out the cache's position map (page * page_size + slot of each
    token, which the cache computes on the host from its page table) and runs no kernel: the host KV reader
    gathers from the page views itself (`ModelRuntime.kv_positions`)."""

    def __init__(self, kernel: Any, num_layers: int) -> None:
        self.kernel = kernel
        self.pages: list[Any] = [None] * num_layers
        self.capturing = True
        self.positions_only = False
        self.positions: np.ndarray | None = None

    def __call__(self, pages: Any, position_map: Any, k: Any, v: Any, layer_id: int) -> None:
        if self.capturing:
            self.pages[layer_id] = pages
        if self.positions_only:
            if layer_id == 0:
                self.positions = position_map.numpy()  # [n] int32, a copy
            return
        self.kernel(pages, position_map, k, v, layer_id)

    def take_pages(self) -> list[Any]:
        """Stop recording and hand over the captured pages (the recorder keeps no reference)."""
        pages, self.pages, self.capturing = self.pages, [], False
        if any(p is None for p in pages):
            raise RuntimeError("kv cache: not every layer's pages were captured")
        return pages


def create_kv_cache(
    spec: list[Any], lib: tvm.runtime.Module, sizes: dict[str, int], device: tvm.runtime.Device, num_layers: int
) -> tuple[Any, _Recorder]:
    """Build the cache exactly as the model would, with a recording `f_debug_get_kv`. `sizes` maps SYMBOLS."""

    def fn(name: str) -> Any:
        f = lib.get_function(name, query_imports=True)
        if f is None:
            raise RuntimeError(f"kernel {name} not found in the model library")
        return f

    def dec(a: dict[str, Any]) -> Any:
        ((kind, val),) = a.items()
        if kind == "shape":
            return ShapeTuple([sizes[x] if isinstance(x, str) else x for x in val])
        if kind in ("int", "bool", "float", "str"):
            return val
        if kind == "zeros":
            return tvm.runtime.tensor(np.zeros((), dtype=val), device)
        if kind == "func":
            return fn(val)
        if kind == "tuple":
            return [dec(x) for x in val]
        raise RuntimeError(f"bad kv cache arg spec {a}")

    args = [dec(a) for a in spec]
    recorder = _Recorder(args[DEBUG_GET_KV_INDEX], num_layers)
    args[DEBUG_GET_KV_INDEX] = tvm.runtime.convert(recorder)
    kv = tvm.get_global_func(CREATE_BUILTIN)(*args)
    return kv, recorder
