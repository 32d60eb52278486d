"""Quantizers and GGUF block repacking into the model's quantized arrays (`llama_relax.quantization`).

All functions take and return `[out, in]` row-major arrays (groups of 32 run along `in`); the model stores their
transposes, k-major (`llama_relax.quantization`), which the loader makes as it yields them.
- `quantize(fmt, w, scale_dtype)`: float weights -> the format's arrays (q4: symmetric, w = scale * (q - 8) with
  scale = max|w| / 7 per group; q8: w = scale * q with scale = max|w| / 127, as GGUF's Q8_0).
- `from_gguf_blocks(qtype, raw, out, k)`: a GGUF tensor's own Q4_0 / Q4_1 / Q8_0 blocks -> the same arrays, exactly
  (the scales are float16 in the file and exact in float32; the nibbles keep llama.cpp's order).
- `dequantize(fmt, arrays)`: the float32 values a kernel sees (tests and the NumPy reference use it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llama_relax.quantization import GROUP, WeightFormat

HALF = GROUP // 2
# GGUF block layouts (bytes per block of 32): Q4_0 = f16 d + 16 B; Q4_1 = f16 d + f16 m + 16 B; Q8_0 = f16 d + 32 B.
GGUF_NATIVE = {"Q4_0": WeightFormat.Q4, "Q4_1": WeightFormat.Q4, "Q8_0": WeightFormat.Q8}
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def _groups(w: np.ndarray) -> np.ndarray:
    out, k = w.shape
    if k % GROUP:
        raise ValueError(f"rows of {k} values do not split into groups of {GROUP}")
    return w.reshape(out, k // GROUP, GROUP)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 `[out, in]` -> `[out, in/2]`: byte j of a group holds element j (low) and j + 16 (high)."""
    g = _groups(q).astype(np.uint8)
    return (g[..., :HALF] | (g[..., HALF:] << 4)).reshape(q.shape[0], -1)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    out = packed.shape[0]
    g = packed.reshape(out, -1, HALF)
    return np.concatenate([g & 15, g >> 4], axis=2).reshape(out, -1)


ROWS_PER_CHUNK = 2048  # quantize this many rows at a time: float temporaries stay small for big embeddings


def quantize(fmt: WeightFormat, w: np.ndarray, scale_dtype: str = "float32") -> list[np.ndarray]:
    """The arrays of `w` ([out, in] float) in `fmt` (see the module docstring), a chunk of rows at a time."""
    return quantize_rows_from(fmt, w.shape[0], lambda i, j: w[i:j], scale_dtype)


def quantize_rows_from(
    fmt: WeightFormat, rows: int, read: Callable[[int, int], np.ndarray], scale_dtype: str = "float32"
) -> list[np.ndarray]:
    """Quantize a `[rows, in]` tensor that `read(i, j)` hands out rows [i, j) of, `ROWS_PER_CHUNK` rows at a time,
    into preallocated outputs: a reader that reads from the file per call never holds the float tensor (a 1.2B
    model's 1 GiB float32 embedding), only one chunk of it."""
    first = _quantize_rows(fmt, read(0, min(rows, ROWS_PER_CHUNK)), scale_dtype)
    if rows <= ROWS_PER_CHUNK:
        return first
    outs = [np.empty((rows, *a.shape[1:]), a.dtype) for a in first]
    for o, a in zip(outs, first, strict=True):
        o[: a.shape[0]] = a
    for i in range(ROWS_PER_CHUNK, rows, ROWS_PER_CHUNK):
        for o, a in zip(outs, _quantize_rows(fmt, read(i, min(rows, i + ROWS_PER_CHUNK)), scale_dtype), strict=True):
            o[i : i + a.shape[0]] = a
    return outs


def _quantize_rows(fmt: WeightFormat, w: np.ndarray, scale_dtype: str) -> list[np.ndarray]:
    g = _groups(np.asarray(w, dtype=np.float32))
    amax = np.abs(g).max(axis=2)  # [out, groups]
    if fmt is WeightFormat.Q4:
        scale = (amax / 7.0).astype(scale_dtype)
        s = scale.astype(np.float32)
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
        q = np.clip(np.rint(g * inv[..., None]) + 8, 0, 15).astype(np.uint8).reshape(w.shape)
        return [pack_nibbles(q), scale, (-8.0 * s).astype(scale_dtype)]
    if fmt is WeightFormat.Q8:
        scale = (amax / 127.0).astype(scale_dtype)
        s = scale.astype(np.float32)
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
        q = np.clip(np.rint(g * inv[..., None]), -127, 127).astype(np.int8).reshape(w.shape)
        return [q, scale]
    raise ValueError(f"not a quantized format: {fmt}")


def dequantize(fmt: WeightFormat, arrays: list[np.ndarray]) -> np.ndarray:
    """float32 `[out, in]`, computed as the kernels do (scale * q + zero, in float32)."""
    if fmt is WeightFormat.Q4:
        packed, scale, zero = arrays
        q = unpack_nibbles(packed).astype(np.float32)
        s = np.repeat(scale.astype(np.float32), GROUP, axis=1)
        z = np.repeat(zero.astype(np.float32), GROUP, axis=1)
        return s * q + z
    if fmt is WeightFormat.Q8:
        q, scale = arrays
        return np.repeat(scale.astype(np.float32), GROUP, axis=1) * q.astype(np.float32)
    raise ValueError(f"not a quantized format: {fmt}")


def from_gguf_blocks(qtype: str, raw: np.ndarray, out: int, k: int, scale_dtype: str = "float32") -> list[np.ndarray]:
    """A GGUF Q4_0 / Q4_1 / Q8_0 tensor's raw blocks (`[out, in]` values) as the model's arrays, exactly."""
    if qtype not in _BLOCK_BYTES:
        raise ValueError(f"GGUF type {qtype} is not stored natively (only {', '.join(_BLOCK_BYTES)})")
    if k % GROUP:
        raise ValueError(f"rows of {k} values do not split into groups of {GROUP}")
    blocks = np.asarray(raw, dtype=np.uint8).reshape(out, k // GROUP, _BLOCK_BYTES[qtype])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(scale_dtype)  # [out, groups]
    if qtype == "Q8_0":
        q = blocks[..., 2:].copy().view(np.int8).reshape(out, k)
        return [np.ascontiguousarray(q), d]
    if qtype == "Q4_0":
        qs = blocks[..., 2:]
        zero = (-8.0 * d.astype(np.float32)).astype(scale_dtype)
    else:
        qs = blocks[..., 4:]
        zero = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(scale_dtype)
    return [np.ascontiguousarray(qs.reshape(out, k // 2)), d, zero]
