"""Host arrays the runtime can take zero-copy: 64-byte aligned (TVM's allocation alignment), C-contiguous."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ALIGN = 64


def aligned_empty(shape: Sequence[int], dtype: str, align: int = ALIGN) -> np.ndarray:
    """An uninitialized array whose data is `align`-byte aligned (TVM accepts such buffers zero-copy)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def is_aligned(a: np.ndarray, align: int = ALIGN) -> bool:
    return a.ctypes.data % align == 0


def aligned_copy(a: np.ndarray, dtype=None) -> np.ndarray:
    """A C-contiguous, aligned copy of `a` (in `dtype` if given)."""
    out = aligned_empty(a.shape, str(np.dtype(dtype or a.dtype)))
    out[...] = a
    return out
