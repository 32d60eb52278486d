"""`--kv-cache-dtype`: the element type of the paged KV cache, apart from the model's compute dtype.

The model computes in its `dtype` (float32 on the CPU); K and V are stored in the cache's dtype. With float16 KV the
model casts the fused qkv to float16 before `attention_with_fused_qkv` (TVM's cache requires q, k, v, the output
and the pages to share one dtype) and the attention output back; the CPU attention kernels convert float16 to
float32 in registers and accumulate in float32. KV bytes per token = 2 x layers x kv_heads x head_dim x itemsize.

Call order: `resolve_kv_dtype(flag, dtype, target_kind)` once at the edge (CLI, serve config) -> the value travels
as a plain string ("float32" / "float16") through `compile_model`, `CompiledModel.kv_dtype` and the KV payloads.
"""

from __future__ import annotations

import enum

from llama_relax.config import LlamaConfig
from llama_relax.errors import UserError


class KVCacheDtype(enum.Enum):
    """`--kv-cache-dtype`."""

    AUTO = "auto"  # float16 (see DEFAULT)
    FLOAT32 = "float32"
    FLOAT16 = "float16"


DEFAULT = KVCacheDtype.FLOAT16  # greedy tokens and last logits hold against float32 KV (BENCHMARK.md, #27)
STORAGE_DTYPES = ("float32", "float16")


def resolve_kv_dtype(flag: str | KVCacheDtype | None, dtype: str, target_kind: str = "llvm") -> str:
    """The cache's storage dtype for `--kv-cache-dtype flag` with compute `dtype` on `target_kind`.

    `auto` (and None) is float16 everywhere: on CUDA float16 is the compute dtype too."""
    try:
        choice = KVCacheDtype(flag.value if isinstance(flag, KVCacheDtype) else (flag or "auto"))
    except ValueError:
        names = ", ".join(k.value for k in KVCacheDtype)
        raise UserError(f"--kv-cache-dtype: {flag!r} is not one of {names}") from None
    if choice is KVCacheDtype.AUTO:
        choice = DEFAULT
    if dtype not in STORAGE_DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
    del target_kind  # both storage dtypes work on every target
    return choice.value


def kv_bytes_per_token(config: LlamaConfig, kv_dtype: str, layers: int | None = None) -> int:
    """Bytes one token's K and V take in the cache (all layers, or `layers` of them)."""
    n = config.num_hidden_layers if layers is None else layers
    itemsize = {"float32": 4, "float16": 2}[kv_dtype]
    return 2 * n * config.num_key_value_heads * config.head_dim * itemsize
