"""A module pass that swaps TVM's serial CPU attention kernels in a compiled Llama module for ours.

TIRPagedKVCache registers its llvm kernels under these global names; the KV cache's constructor call refers to
them by GlobalVar, so replacing the PrimFunc behind each GlobalVar is enough (signatures are identical)."""

from __future__ import annotations

import tvm

from llama_relax.config import LlamaConfig
from llama_relax.kernels.attention_cpu import cpu_attention_kernels
from llama_relax.kernels.attention_q8 import (
    attention_decode_q8,
    attention_prefill_q8,
    attention_prefill_ragged_q8,
    merge_state_q8,
)

# stock global name in the exported module -> key of our kernel in `cpu_attention_kernels`
STOCK_TO_OURS = {
    "batch_prefill_ragged_kv": "tir_attention_prefill_ragged_cpu",
    "batch_prefill_paged_kv_cpu": "tir_attention_prefill_cpu",
    "batch_decode_paged_kv_cpu": "tir_attention_decode_cpu",
    "merge_state_inplace_cpu": "tir_attention_merge_state_cpu",
}


def cpu_attention_pass(config: LlamaConfig, kv_dtype: str) -> tvm.transform.Pass:
    """Replace the stock CPU attention kernels (all of `STOCK_TO_OURS` must be present) with ours for pages of
    `kv_dtype` ("float32", "float16" or "q8_0")."""

    @tvm.transform.module_pass(opt_level=0, name="PdserveCpuAttention")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        h_kv, h_q, d = config.num_key_value_heads, config.num_attention_heads, config.head_dim
        if kv_dtype == "q8_0":
            ours = {
                "tir_attention_prefill_ragged_cpu": attention_prefill_ragged_q8(h_kv, h_q, d),
                "tir_attention_prefill_cpu": attention_prefill_q8(h_kv, h_q, d),
                "tir_attention_decode_cpu": attention_decode_q8(h_kv, h_q, d),
                "tir_attention_merge_state_cpu": merge_state_q8(d),
            }
        else:
            ours = cpu_attention_kernels(h_kv, h_q, d, kv_dtype, config.rope_scaling.to_tvm_dict())
        names = {gv.name_hint: gv for gv in mod.get_global_vars()}
        missing = [n for n in STOCK_TO_OURS if n not in names]
        if missing:
            raise RuntimeError(f"cpu attention pass: stock kernels not found in the module: {missing}")
        mod = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
        for stock, key in STOCK_TO_OURS.items():
            mod[names[stock]] = ours[key].with_attr("global_symbol", stock)
        return mod

    return _pass
