"""GGUF files (llama.cpp): metadata as plain Python values, and dequantized weights in HF layout.

llama.cpp's converter permutes the rows of `attn_q`/`attn_k` (HF's `permute(w, n_head)`) for its interleaved
RoPE; `GGUFSource` undoes that so the weights equal the HF originals (the model uses rotate-half RoPE).
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from llama_relax.config import LlamaConfig
from llama_relax.loader.mapping import TensorSource, fused_parts, iter_params
from llama_relax.loader.quantize import GGUF_NATIVE
from llama_relax.quantization import (
    NO_QUANTIZATION,
    Quantization,
    QuantPlan,
    WeightFormat,
    check_group,
    quantizable_weights,
)

GGUF_MAGIC = b"GGUF"

# HF name (per-layer part after `model.layers.{i}.`) -> GGUF name (after `blk.{i}.`).
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Plain float encodings, dequantized here; everything else goes through `gguf.quants.dequantize`.
_INTEGER_TYPES = {"I8", "I16", "I32", "I64"}


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name for an HF parameter name (`model.layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`)."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    if hf_name.startswith("model.layers."):
        layer, _, rest = hf_name[len("model.layers.") :].partition(".")
        if rest in _LAYER_NAMES:
            return f"blk.{layer}.{_LAYER_NAMES[rest]}"
    raise KeyError(f"no GGUF name for {hf_name!r}")


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    """True when the file starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def _cached_reader(path: str, mtime_ns: int, size: int) -> GGUFReader:
    return GGUFReader(path)


def release_readers() -> None:
    """Forget the cached reader: its memory-mapped file pages stop counting against the process once loading is
    done and nothing else holds its tensors."""
    _cached_reader.cache_clear()


def open_gguf(path: str | os.PathLike[str], *, tokenizer: bool = False) -> GGUFReader:
    """A `GGUFReader` for `path`; the last one is cached (parsing big vocabularies takes seconds). `tokenizer=True`:
    the caller reads the vocabulary, so a cached reader that shed it (`shed_tokenizer_fields`) is parsed again."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {p}")
    if not is_gguf_file(p):
        raise ValueError(f"{p}: not a GGUF file (bad magic)")
    st = p.stat()
    reader = _cached_reader(str(p.resolve()), st.st_mtime_ns, st.st_size)
    if tokenizer and getattr(reader, "_pdserve_shed", False):
        release_readers()
        reader = _cached_reader(str(p.resolve()), st.st_mtime_ns, st.st_size)
    return reader


_KEEP_TOKENIZER_FIELDS = ("tokenizer.ggml.model", "tokenizer.ggml.pre")


def shed_tokenizer_fields(path: str | os.PathLike[str]) -> None:
    """Drop the vocabulary arrays from the cached reader of `path` once the tokenizer is built: gguf-py holds one
    NumPy view per token and merge (~100 MB for a 49k vocabulary), which would otherwise stay through the
    weight upload and the KV cache's allocation, the load's peak."""
    reader = open_gguf(path)
    for name in [n for n in reader.fields if n.startswith("tokenizer.ggml.") and n not in _KEEP_TOKENIZER_FIELDS]:
        del reader.fields[name]
    reader._pdserve_shed = True  # type: ignore[attr-defined]
    gc.collect()


def _field_value(field: Any) -> Any:
    """A reader field as a plain Python value (float32 scalars rounded to their shortest repr)."""
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.FLOAT32:
        value = float(str(np.float32(value)))
    return value


def gguf_metadata(path: str | os.PathLike[str] | Any) -> dict[str, Any]:
    """All KV fields as plain Python values, plus derived `has_output_tensor` and `tokenizer.ggml.tokens.count`.

    `path` may also be a `ModelSource`. Lists are fresh copies; the reader itself is cached.
    """
    path = getattr(path, "path", path)
    reader = open_gguf(path)
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = _field_value(field)
    meta["has_output_tensor"] = any(t.name == "output.weight" for t in reader.tensors)
    if isinstance(meta.get("tokenizer.ggml.tokens"), list):
        meta.setdefault("tokenizer.ggml.tokens.count", len(meta["tokenizer.ggml.tokens"]))
    return meta


def load_gguf_config(path: str | os.PathLike[str], **overrides: Any) -> LlamaConfig:
    """`LlamaConfig` from a GGUF file's metadata."""
    meta = gguf_metadata(path)
    split_count = int(meta.get("split.count", 1) or 1)
    if split_count > 1:
        raise ValueError(f"{path}: split GGUF files ({split_count} parts) are not supported; merge them first")
    return LlamaConfig.from_gguf_metadata(meta, **overrides)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head)` on the output rows of a q/k weight (`[out, in]`)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter `permute(w, n_head)` (HF rotate-half rows -> interleaved pairs)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(tensor: Any) -> np.ndarray:
    """A reader tensor as float32 in numpy (row-major, `[ne1, ne0]`) order; ValueError if the type is unsupported."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if qtype.name in _INTEGER_TYPES:
        raise ValueError(
            f"tensor {tensor.name!r}: unsupported GGUF type {qtype.name} (integer tensors are not weights)"
        )
    if qtype == GGMLQuantizationType.F64:
        data = np.asarray(tensor.data).view(np.float64).astype(np.float32)
    else:
        try:
            data = dequantize(np.asarray(tensor.data), qtype)
        except (NotImplementedError, KeyError) as e:
            raise ValueError(f"tensor {tensor.name!r}: unsupported GGUF quantization type {qtype.name}") from e
    if data.size != int(np.prod(shape)):
        raise ValueError(f"tensor {tensor.name!r}: dequantized {data.size} values, expected shape {shape}")
    return data.reshape(shape)


class GGUFSource(TensorSource):
    """Tensors of a GGUF file under HF names: dequantized to float32, or (`native`) their own blocks; q/k rows
    put back in HF's order (`row_order`)."""

    def __init__(self, path: str | os.PathLike[str], config: LlamaConfig) -> None:
        self.path = Path(path)
        self.description = str(self.path)
        self.config = config
        self._tensors = {t.name: t for t in open_gguf(self.path).tensors}

    def label(self, name: str) -> str:
        try:
            return gguf_name(name)
        except KeyError:
            return name

    def get(self, name: str) -> np.ndarray | None:
        tensor = self._tensors.get(self.label(name))
        return None if tensor is None else dequantize_tensor(tensor)

    def type_name(self, name: str) -> str | None:
        tensor = self._tensors.get(self.label(name))
        return None if tensor is None else GGMLQuantizationType(tensor.tensor_type).name

    def native(self, name: str) -> tuple[str, np.ndarray] | None:
        qtype = self.type_name(name)
        if qtype is None or qtype not in GGUF_NATIVE:
            return None
        return qtype, np.asarray(self._tensors[self.label(name)].data)

    def row_order(self, name: str) -> np.ndarray | None:
        heads = None
        if name.endswith("self_attn.q_proj.weight"):
            heads = self.config.num_attention_heads
        elif name.endswith("self_attn.k_proj.weight"):
            heads = self.config.num_key_value_heads
        if heads is None:
            return None
        rows = self.config.q_size if heads == self.config.num_attention_heads else self.config.kv_size
        return unpermute_rope_rows(np.arange(rows)[:, None], heads)[:, 0]


def gguf_plan(path: str | os.PathLike[str], config: LlamaConfig) -> QuantPlan:
    """`--quantization gguf`: each weight keeps its file's block format where the model has it (Q4_0 / Q4_1 ->
    Q4, Q8_0 -> Q8; the parts of a fused weight must agree), and is dequantized to the model dtype otherwise."""
    src = GGUFSource(path, config)
    formats = []
    for name, _, k in quantizable_weights(config):
        parts = fused_parts(name)
        fmts = {GGUF_NATIVE.get(src.type_name(p) or "", WeightFormat.F) for p in parts}
        fmt = fmts.pop() if len(fmts) == 1 else WeightFormat.F
        if fmt is not WeightFormat.F:
            check_group(src.label(parts[0]), k)
        formats.append((name, fmt))
    return QuantPlan(Quantization.GGUF, tuple(formats), "float16")


def load_gguf_params(
    path: str | os.PathLike[str],
    config: LlamaConfig,
    dtype: str = "float32",
    progress: bool = False,
    plan: QuantPlan = NO_QUANTIZATION,
    only: Collection[str] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Every model parameter from a GGUF file, one at a time (see `iter_params`)."""
    return iter_params(GGUFSource(path, config), config, dtype, progress, plan, only)
