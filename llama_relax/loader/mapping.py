"""The model's parameter table and the format-independent assembly of it.

Every format reader exposes its tensors under Hugging Face names in HF layout (`[out, in]`, q/k rows in HF's
rotate-half order) through a `TensorSource`; `iter_params` validates their shapes, fuses q/k/v and gate/up,
transposes unquantized linear weights to the model's `[in, out]` layout and casts them to the requested dtype, or
(per the `QuantPlan`) keeps a GGUF tensor's own blocks / quantizes it, one parameter at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import numpy as np

from llama_relax.arrays import aligned_copy, aligned_empty
from llama_relax.config import LlamaConfig
from llama_relax.loader.quantize import GGUF_NATIVE, from_gguf_blocks, quantize, quantize_rows_from
from llama_relax.quantization import NO_QUANTIZATION, QuantPlan, WeightFormat, quantized_array_names

DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float16": np.float16}

# Fused model parameter -> the HF tensors concatenated (along HF's output rows) to make it.
_FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
# Model linear weights stored transposed relative to HF (`[in, out]`), unfused.
_TRANSPOSED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def expected_param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every model parameter, in load order. The single source of truth for validation."""
    h, inter, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.qkv_proj.weight"] = (h, config.q_size + 2 * config.kv_size)
        shapes[p + "self_attn.o_proj.weight"] = (config.q_size, h)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_up_proj.weight"] = (h, 2 * inter)
        shapes[p + "mlp.down_proj.weight"] = (inter, h)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def hf_tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> HF shape (`[out, in]`) of every source tensor, derived from `expected_param_shapes`."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in expected_param_shapes(config).items():
        prefix, suffix = _split_layer_name(name)
        if suffix in _FUSED:
            parts = _FUSED[suffix]
            sizes = _fused_sizes(config, suffix)
            for part, size in zip(parts, sizes, strict=True):
                out[prefix + part] = (size, shape[0])
        elif suffix in _TRANSPOSED:
            out[name] = (shape[1], shape[0])
        else:
            out[name] = shape
    return out


def _split_layer_name(name: str) -> tuple[str, str]:
    """`model.layers.3.mlp.x` -> (`model.layers.3.`, `mlp.x`); other names -> ("", name)."""
    if name.startswith("model.layers."):
        head, _, rest = name[len("model.layers.") :].partition(".")
        return f"model.layers.{head}.", rest
    return "", name


def fused_parts(name: str) -> list[str]:
    """The HF tensors a model weight is made of (itself, or the parts of a fused one)."""
    prefix, suffix = _split_layer_name(name)
    return [prefix + p for p in _FUSED[suffix]] if suffix in _FUSED else [name]


def _fused_sizes(config: LlamaConfig, suffix: str) -> tuple[int, ...]:
    if suffix == "self_attn.qkv_proj.weight":
        return (config.q_size, config.kv_size, config.kv_size)
    return (config.intermediate_size, config.intermediate_size)


def check_dtype(dtype: str) -> type[np.floating]:
    """The numpy type for a requested dtype name, or ValueError."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class TensorSource:
    """Tensors of one model file (or shard set) under HF names, in HF layout. Subclassed per format."""

    description = "model"

    def label(self, name: str) -> str:
        """How the tensor named `name` (an HF name) is called in the file, for error messages."""
        return name

    def get(self, name: str) -> np.ndarray | None:
        """The tensor in HF shape (any float dtype), or None when the file lacks it."""
        raise NotImplementedError

    def native(self, name: str) -> tuple[str, np.ndarray] | None:
        """(GGUF type name, raw blocks) when the file stores the tensor in a block format the model can keep."""
        return None

    def row_order(self, name: str) -> np.ndarray | None:
        """A permutation of the tensor's output rows to apply after loading (e.g. undoing GGUF's q/k order)."""
        return None

    def rows(self, name: str) -> tuple[tuple[int, ...], Callable[[int, int], np.ndarray]] | None:
        """(shape, read(i, j) -> rows [i, j)) for formats that can read part of a tensor; None = read it whole."""
        return None


def _check_shape(src: TensorSource, name: str, got: tuple[int, ...], shape: tuple[int, ...]) -> None:
    if got != shape:
        label = src.label(name)
        raise ValueError(f"{src.description}: tensor {label!r} has the wrong shape: expected {shape}, got {got}")


def _fetch(src: TensorSource, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Get, validate and reorder one source tensor. Shapes are numpy/HF order `[out, in]` (GGUF lists ne0 first)."""
    array = src.get(name)
    if array is None:
        raise ValueError(f"{src.description}: missing tensor {src.label(name)!r} (expected shape {shape})")
    _check_shape(src, name, tuple(int(d) for d in array.shape), shape)
    if array.dtype not in (np.float16, np.float32, np.float64):
        array = array.astype(np.float32)  # bfloat16 and friends: exact in float32
    order = src.row_order(name)
    return array if order is None else array[order]


def _fetch_quantized(
    src: TensorSource, name: str, shape: tuple[int, ...], fmt: WeightFormat, scale_dtype: str
) -> list[np.ndarray]:
    """One source tensor as `fmt` arrays: the file's own blocks when it has them in `fmt`, else quantized here."""
    out, k = shape
    got = src.native(name)
    if got is not None and GGUF_NATIVE.get(got[0]) is fmt:
        try:
            arrays = from_gguf_blocks(got[0], got[1], out, k, scale_dtype)
        except ValueError as e:
            raise ValueError(f"{src.description}: tensor {src.label(name)!r}: {e}") from None
        order = src.row_order(name)
        return arrays if order is None else [a[order] for a in arrays]
    try:
        reader = src.rows(name) if src.row_order(name) is None else None
        if reader is None:
            return quantize(fmt, _fetch(src, name, shape), scale_dtype)
        _check_shape(src, name, reader[0], shape)
        return quantize_rows_from(fmt, out, lambda i, j: np.asarray(reader[1](i, j), dtype=np.float32), scale_dtype)
    except ValueError as e:
        raise ValueError(f"{src.description}: tensor {src.label(name)!r}: {e}") from None


def _copy(array: np.ndarray, np_dtype: type[np.floating]) -> np.ndarray:
    """An owned, C-contiguous, aligned copy in `np_dtype` (the runtime takes it zero-copy)."""
    return aligned_copy(array, np_dtype)


def iter_params(
    src: TensorSource,
    config: LlamaConfig,
    dtype: str = "float32",
    progress: bool = False,
    plan: QuantPlan = NO_QUANTIZATION,
    only: Collection[str] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Every model parameter, one at a time (`(name, array)`, in load order), so a caller can hand each to the
    runtime and drop it: loading never holds a second copy of the weights. Quantized weights (per `plan`) yield
    their arrays under `<weight>.qweight` / `.scale` / `.zero`. `only`: the parameters (model names) to read; the
    others are never read (a pipeline stage streams just its own)."""
    np_dtype = check_dtype(dtype)
    expected = expected_param_shapes(config)
    if only is not None:
        expected = {n: s for n, s in expected.items() if n in only}
    hf_shapes = hf_tensor_shapes(config)
    for name in _progress(expected, progress, src.description):
        suffix = _split_layer_name(name)[1]
        parts = fused_parts(name)
        fmt = plan.format(name)
        if fmt is not WeightFormat.F:  # [out, in] arrays, fused parts stacked along the output rows, then k-major
            pieces = [_fetch_quantized(src, p, hf_shapes[p], fmt, plan.scale_dtype) for p in parts]
            for j, suffix_name in enumerate(quantized_array_names(fmt)):
                parts_j = [pc[j] for pc in pieces]
                rows = parts_j[0] if len(parts_j) == 1 else np.concatenate(parts_j)
                yield f"{name}.{suffix_name}", aligned_copy(rows.T)
            continue
        if suffix in _FUSED:
            out = aligned_empty(expected[name], np.dtype(np_dtype).name)
            col = 0
            for part in parts:
                w = _fetch(src, part, hf_shapes[part])
                out[:, col : col + w.shape[0]] = w.T
                col += w.shape[0]
            yield name, out
        elif suffix in _TRANSPOSED:
            yield name, _copy(_fetch(src, name, hf_shapes[name]).T, np_dtype)
        else:
            yield name, _copy(_fetch(src, name, hf_shapes[name]), np_dtype)


def build_params(
    src: TensorSource,
    config: LlamaConfig,
    dtype: str = "float32",
    progress: bool = False,
    plan: QuantPlan = NO_QUANTIZATION,
) -> dict[str, np.ndarray]:
    """Every model parameter at once (tests and tools; serving streams `iter_params` into the runtime)."""
    return dict(iter_params(src, config, dtype, progress, plan))


def _progress(names: dict[str, tuple[int, ...]], enabled: bool, desc: str) -> Iterator[str]:
    if not enabled:
        yield from names
        return
    from tqdm import tqdm

    with tqdm(total=len(names), desc=f"loading {Path(desc).name}", unit="tensor", file=sys.stderr) as bar:
        for name in names:
            yield name
            bar.update(1)
