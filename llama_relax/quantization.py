"""Quantized weights in the model, MLC-LLM style: the schemes, the per-parameter plan, and the nn modules that
declare quantized parameters and dequantize them inside the kernels.

Weights stay quantized in memory; only kernels dequantize. Two formats, both with groups of 32 along the input
(reduction) dimension k, stored k-major like the model's float `[in, out]` weights, so kernels read a row of
consecutive outputs as one vector (the decode GEMV streams rows; the prefill GEMM packs contiguous panels):
- `Q4`: `qweight: uint8 [in/2, out]`, `scale`, `zero: [in/32, out]`; w = scale * q + zero with q in 0..15. In group
  g, byte row 16 g + j holds k = 32 g + j in its low nibble and k = 32 g + j + 16 in its high nibble (llama.cpp's
  order within a block). GGUF Q4_0 (zero = -8 d), Q4_1 (zero = m) and the symmetric q4f32_1 / q4f16_1 (zero = -8
  scale) all map to it.
- `Q8`: `qweight: int8 [in, out]`, `scale: [in/32, out]`; w = scale * q (GGUF Q8_0, q8_0).
The embedding table (and an untied LM head) is quantized as a `[hidden, vocab]` weight: the LM head is its matmul,
an embedding lookup reads one column. The loader (`llama_relax.loader.quantize`)
produces these arrays; `llama_relax.schedule_matmul` recognises the `dequantize` block the modules emit and
dequantizes a panel per GEMM tile (prefill) or in registers (GEMV, decode).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from llama_relax.config import LlamaConfig

GROUP = 32
DEQUANT_BLOCK = "dequantize"  # the TE stage name the CPU schedules look for (see schedule_matmul)


class Quantization(enum.Enum):
    """`--quantization`: how linear weights (and the embedding / LM head) are stored."""

    NONE = "none"  # float32 / float16, as loaded
    GGUF = "gguf"  # a .gguf file's own blocks: Q4_0 / Q4_1 / Q8_0 natively, other types dequantized
    Q4F32_1 = "q4f32_1"  # group-32 symmetric int4, float32 scales (CPU)
    Q4F16_1 = "q4f16_1"  # group-32 symmetric int4, float16 scales (CUDA)
    Q8_0 = "q8_0"  # group-32 int8, float32 scales


class WeightFormat(enum.Enum):
    F = "f"  # the model dtype
    Q4 = "q4"
    Q8 = "q8"


@dataclass(frozen=True)
class QuantPlan:
    """The format of every quantizable parameter (`<module>.weight` names), and the scales' dtype.

    Part of the compiled model's cache key: a different plan is a different library."""

    quantization: Quantization
    formats: tuple[tuple[str, WeightFormat], ...] = ()
    scale_dtype: str = "float32"

    def format(self, name: str) -> WeightFormat:
        return dict(self.formats).get(name, WeightFormat.F)

    def key(self) -> dict[str, object]:
        return {
            "q": self.quantization.value,
            "scale": self.scale_dtype,
            "formats": [[n, f.value] for n, f in self.formats if f is not WeightFormat.F],
        }

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for _, f in self.formats:
            counts[f.value] = counts.get(f.value, 0) + 1
        return f"{self.quantization.value} (" + ", ".join(f"{v} x{n}" for v, n in sorted(counts.items())) + ")"


NO_QUANTIZATION = QuantPlan(Quantization.NONE)


def quantizable_weights(config: LlamaConfig) -> list[tuple[str, int, int]]:
    """(weight name, out features, in features) of every parameter a scheme may quantize."""
    out = [("model.embed_tokens.weight", config.vocab_size, config.hidden_size)]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out.append((p + "self_attn.qkv_proj.weight", config.q_size + 2 * config.kv_size, config.hidden_size))
        out.append((p + "self_attn.o_proj.weight", config.hidden_size, config.q_size))
        out.append((p + "mlp.gate_up_proj.weight", 2 * config.intermediate_size, config.hidden_size))
        out.append((p + "mlp.down_proj.weight", config.hidden_size, config.intermediate_size))
    if not config.tie_word_embeddings:
        out.append(("lm_head.weight", config.vocab_size, config.hidden_size))
    return out


def uniform_plan(quantization: Quantization, config: LlamaConfig, target_kind: str = "llvm") -> QuantPlan:
    """The plan of a scheme that quantizes every linear weight and the embedding alike (not `gguf`)."""
    if quantization is Quantization.NONE:
        return NO_QUANTIZATION
    if quantization is Quantization.GGUF:
        raise ValueError("--quantization gguf needs a .gguf model (its tensors' own types make the plan)")
    if quantization is Quantization.Q4F16_1 and target_kind == "llvm":
        raise ValueError("--quantization q4f16_1 is for CUDA (float16 scales); on the CPU use q4f32_1")
    fmt = WeightFormat.Q8 if quantization is Quantization.Q8_0 else WeightFormat.Q4
    formats = []
    for name, _, k in quantizable_weights(config):
        check_group(name, k)
        formats.append((name, fmt))
    scale = "float16" if quantization is Quantization.Q4F16_1 else "float32"
    return QuantPlan(quantization, tuple(formats), scale)


def check_group(name: str, in_features: int) -> None:
    if in_features % GROUP:
        raise ValueError(f"tensor {name!r}: its rows of {in_features} values do not split into groups of {GROUP}")


def quantized_array_names(fmt: WeightFormat) -> tuple[str, ...]:
    return ("qweight", "scale", "zero") if fmt is WeightFormat.Q4 else ("qweight", "scale")


def quantized_arrays(name: str, out: int, k: int, fmt: WeightFormat, scale_dtype: str) -> dict[str, tuple]:
    """Parameter name -> (shape, dtype) of a quantized weight's arrays: `x.weight` -> `x.weight.qweight`, ..."""
    groups = (k // GROUP, out)
    if fmt is WeightFormat.Q4:
        return {
            f"{name}.qweight": ((k // 2, out), "uint8"),
            f"{name}.scale": (groups, scale_dtype),
            f"{name}.zero": (groups, scale_dtype),
        }
    if fmt is WeightFormat.Q8:
        return {f"{name}.qweight": ((k, out), "int8"), f"{name}.scale": (groups, scale_dtype)}
    raise ValueError(f"{name}: not a quantized format: {fmt}")


# ---- TE: dequantize, and the dequantized matmul / embedding lookup -----------------------------------------
def _q4_value(q: te.Tensor, k, n):
    """The 4-bit value of weight (k, n): byte row `g * 16 + j` of column n holds k = 32 g + j (low nibble) and
    k = 32 g + j + 16 (high nibble)."""
    byte = q[(k // GROUP) * (GROUP // 2) + k % (GROUP // 2), n]
    shift = ((k % GROUP) // (GROUP // 2) * 4).astype("uint8")
    return (byte >> shift) & tirx.const(15, "uint8")


def dequant_expr(fmt: WeightFormat, arrays: list[te.Tensor], k, n, dtype: str):
    """The float value of weight (k, n) (k: the input / reduction index, n: the output index)."""
    if fmt is WeightFormat.Q4:
        q, s, z = arrays
        return s[k // GROUP, n].astype(dtype) * _q4_value(q, k, n).astype(dtype) + z[k // GROUP, n].astype(dtype)
    q, s = arrays
    return s[k // GROUP, n].astype(dtype) * q[k, n].astype(dtype)


def dequant_matmul_te(fmt: WeightFormat, dtype: str, out_dtype: str):
    """TE of `y[..., n] = sum_k x[..., k] * W[k, n]` with W dequantized from its arrays in a `dequantize` stage."""

    def compute(x: te.Tensor, *arrays: te.Tensor) -> te.Tensor:
        n_out, k_in = int(arrays[0].shape[1]), int(x.shape[-1])
        w = te.compute((k_in, n_out), lambda k, n: dequant_expr(fmt, list(arrays), k, n, dtype), name=DEQUANT_BLOCK)
        r = te.reduce_axis((0, k_in), name="k")

        def body(*idx):
            return te.sum(x[(*idx[:-1], r)].astype(out_dtype) * w[r, idx[-1]].astype(out_dtype), axis=r)

        return te.compute((*x.shape[:-1], n_out), body, name="matmul")

    return compute


def dequant_take_te(fmt: WeightFormat, dtype: str):
    """TE of an embedding lookup `out[i, h] = table[ids[i], h]` from a quantized `[hidden, vocab]` table."""

    def compute(ids: te.Tensor, *arrays: te.Tensor) -> te.Tensor:
        hidden = int(arrays[1].shape[0]) * GROUP
        return te.compute(
            (ids.shape[0], hidden), lambda i, h: dequant_expr(fmt, list(arrays), h, ids[i], dtype), name="take_dequant"
        )

    return compute


class QuantizedWeight(nn.Module):
    """A weight of `out` x `k` values stored quantized, k-major (`[k (packed), out]`, groups of 32 along k): its
    arrays as parameters, and the ops that read it."""

    def __init__(self, out: int, k: int, fmt: WeightFormat, dtype: str, scale_dtype: str) -> None:
        self.fmt, self.dtype, self.out, self.k = fmt, dtype, out, k
        shapes = list(quantized_arrays("w", out, k, fmt, scale_dtype).values())
        self.qweight = nn.Parameter(*shapes[0])
        self.scale = nn.Parameter(*shapes[1])
        if fmt is WeightFormat.Q4:
            self.zero = nn.Parameter(*shapes[2])

    def arrays(self) -> list[Tensor]:
        return [self.qweight, self.scale, self.zero] if self.fmt is WeightFormat.Q4 else [self.qweight, self.scale]

    def matmul(self, x: Tensor, out_dtype: str | None = None) -> Tensor:  # x: [..., k] -> [..., out]
        te_fn = dequant_matmul_te(self.fmt, self.dtype, out_dtype or self.dtype)
        return op.tensor_expr_op(te_fn, f"{self.fmt.value}_matmul", [x, *self.arrays()])

    def take(self, ids: Tensor) -> Tensor:  # ids: [s] int32 -> [s, k]
        return op.tensor_expr_op(dequant_take_te(self.fmt, self.dtype), f"{self.fmt.value}_take", [ids, *self.arrays()])
