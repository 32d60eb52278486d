"""`--kv-cache-dtype`: the element type of the paged KV cache, apart from the model's compute dtype.

The model computes in its `dtype` (float32 on the CPU); K and V are stored in the cache's dtype. TVM's cache requires
q, k, v, the attention output and the pages to share one dtype and one row width, so:
- float16: the model casts the fused qkv to float16 before `attention_with_fused_qkv` and the output back;
- q8_0 (CPU): llama.cpp's block format, a row of `head_dim` values as `head_dim` int8 quants followed by one
  float16 scale per block of 32 (stored as its two bytes): `head_dim + head_dim / 16` bytes, held in an int8 page
  of that row width. The model applies RoPE itself (the cache's rope mode is `none`), quantizes q, k and v rows,
  and dequantizes the output, which the kernels write as q8_0 too (see `llama_relax.kernels.attention_q8`).
The CPU attention kernels convert in registers and accumulate in float32.
KV bytes per token = 2 x layers x kv_heads x row bytes.

Call order: `resolve_kv_dtype(flag, dtype, target_kind)` once at the edge (CLI, serve config) -> the value travels
as a plain string ("float32" / "float16" / "q8_0") through `compile_model` and `CompiledModel.kv_dtype`;
`kv_storage` gives the pages' element dtype and row width (what KV payloads carry).
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
    Q8_0 = "q8_0"


DEFAULT = KVCacheDtype.FLOAT16  # greedy tokens and last logits hold against float32 KV (BENCHMARK.md, #27)
KV_DTYPES = ("float32", "float16", "q8_0")
Q8_BLOCK = 32  # values per q8_0 block (one float16 scale each)


def kv_storage(kv_dtype: str, head_dim: int) -> tuple[str, int]:
    """(element dtype, row width in elements) of the cache's pages for a head of `head_dim` values."""
    if kv_dtype == "q8_0":
        if head_dim % Q8_BLOCK:
            raise UserError(f"--kv-cache-dtype q8_0: head_dim {head_dim} is not a multiple of {Q8_BLOCK}")
        return "int8", head_dim + 2 * (head_dim // Q8_BLOCK)
    if kv_dtype not in KV_DTYPES:
        raise UserError(f"--kv-cache-dtype: {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    return kv_dtype, head_dim


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
    if dtype not in ("float32", "float16"):
        raise UserError(f"--dtype: {dtype!r} is not one of float32, float16")
    if choice is KVCacheDtype.Q8_0 and target_kind != "llvm":
        raise UserError("--kv-cache-dtype q8_0 is for the CPU (--target llvm); use float16 on CUDA")
    return choice.value


def kv_bytes_per_token(config: LlamaConfig, kv_dtype: str, layers: int | None = None) -> int:
    """Bytes one token's K and V take in the cache (all layers, or `layers` of them)."""
    n = config.num_hidden_layers if layers is None else layers
    elem, row = kv_storage(kv_dtype, config.head_dim)
    itemsize = {"float32": 4, "float16": 2, "int8": 1}[elem]
    return 2 * n * config.num_key_value_heads * row * itemsize
