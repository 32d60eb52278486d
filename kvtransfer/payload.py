"""Transport-neutral KV payload: a msgpack header plus the raw K and V bytes, cut into hash-checked chunks.

Data layout on the wire: the K bytes, then the V bytes (each C-contiguous ``[layers, end-begin, kv_heads,
head_dim]`` in the cache dtype, little-endian as numpy stores it on x86/ARM). Both are cut into ``chunk_bytes``
pieces *separately*: a chunk never straddles the K/V boundary, so the last K chunk and the last V chunk may be
short, and every chunk is a zero-copy view of exactly one array. ``chunk_checksums[i]`` is chunk i's checksum, K
chunks first, of the kind named by ``checksum``:
- ``"xxh3_64"`` (host payloads): XXH3-64, seed 0. ~15 GB/s here against ~3.7 GB/s for zlib's CRC32, so checking
  costs the receiver ~1.5 ms per 24 MiB instead of ~6.5 ms.
- ``"wsum64"`` (device payloads, `nccl_transport`): ``sum((i + 1) * w[i]) mod 2**64`` over the chunk's
  little-endian uint64 words ``w`` (zero-padded), computable by one reduction on a GPU without copying to host.

Zero-copy receive: a sender picks ``chunk_bytes`` as a whole number of layer slabs (`layer_chunk_bytes`: one
layer's K is ``end-begin`` tokens of ``[kv_heads, head_dim]``), so every chunk holds whole layers; the receiver
then hands the import per-layer views of the received chunks (`LayerSlabs`) instead of copying them into one
buffer. Other chunk sizes are still accepted, and assembled by one copy.

``meta`` is opaque bytes for the application (at most ``MAX_META_BYTES``): kvtransfer carries them and never reads
them. The serving engine puts the request's first output token there, so the KV and the token that continues it
arrive together. Dependencies: numpy + msgpack only (no ``llama_relax``, no transport).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack
import numpy as np
import xxhash

# 2: named per-chunk checksums (XXH3-64 or wsum64) instead of CRC32; 3: opaque `meta` bytes; 4: `first_layer` (a
# payload may carry a range of layers: a pipeline stage's part) and manifests (no layers: "commit what you got")
FORMAT_VERSION = 4
DTYPE_SIZES: dict[str, int] = {"float32": 4, "float16": 2, "int8": 1}  # int8: q8_0 rows (quants + scales)
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 64 << 20
MAX_HEADER_BYTES = 1 << 20
MAX_STR_LEN = 256
MAX_META_BYTES = 64 << 10


class ErrorCode(str, Enum):
    """Why a transfer failed; the value is the name carried in acks and `TransferResult.error`."""

    FINGERPRINT_MISMATCH = "FINGERPRINT_MISMATCH"
    DTYPE_MISMATCH = "DTYPE_MISMATCH"
    SHAPE_MISMATCH = "SHAPE_MISMATCH"
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    TRUNCATED = "TRUNCATED"
    MALFORMED = "MALFORMED"
    IMPORT_FAILED = "IMPORT_FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    BUSY = "BUSY"
    UNAVAILABLE = "UNAVAILABLE"  # transport-level failure: receiver unreachable, connection lost, internal error
    UNAUTHENTICATED = "UNAUTHENTICATED"  # the receiver refused the call: missing or wrong cluster token

    @classmethod
    def parse(cls, name: str) -> ErrorCode:
        """The code named `name`; an unknown name (newer peer) maps to MALFORMED."""
        try:
            return cls(name)
        except ValueError:
            return cls.MALFORMED


class PayloadError(Exception):
    """A payload was rejected; `code` says why (raised by header parsing and `PayloadAssembler`)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


def chunk_checksum(data: bytes | bytearray | memoryview) -> int:
    """XXH3-64 (seed 0) of one chunk: the ``"xxh3_64"`` checksum (releases the GIL)."""
    return xxhash.xxh3_64_intdigest(data)


def wsum64(xp: Any, chunk: Any) -> Any:
    """The ``"wsum64"`` checksum of a 1-D uint8 array `chunk` with array module `xp` (numpy or cupy): the
    position-weighted sum of its uint64 words mod 2**64 (detects zeroed, truncated and swapped words). Returns an
    `xp` scalar; call `int()` on it."""
    pad = (-chunk.size) % 8
    if pad:
        chunk = xp.concatenate([chunk, xp.zeros(pad, dtype=xp.uint8)])
    words = chunk.view(xp.uint64)
    return (words * xp.arange(1, words.size + 1, dtype=xp.uint64)).sum(dtype=xp.uint64)


HOST_CHECKSUMS: dict[str, Callable[[memoryview], int]] = {
    "xxh3_64": chunk_checksum,
    "wsum64": lambda data: int(wsum64(np, np.frombuffer(data, dtype=np.uint8))),
}


def layer_chunk_bytes(layer_bytes: int, target: int = DEFAULT_CHUNK_BYTES) -> int:
    """A chunk size of whole layer slabs: as many as fit in `target` (at least one), unless one slab exceeds
    MAX_CHUNK_BYTES (then `target`: the receiver assembles by copying)."""
    if layer_bytes > MAX_CHUNK_BYTES:
        return target
    return layer_bytes * max(1, target // layer_bytes)


def _num_chunks(nbytes: int, chunk_bytes: int) -> int:
    return -(-nbytes // chunk_bytes)


_INT_FIELDS = (
    "page_size",
    "first_layer",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "begin",
    "end",
    "k_bytes",
    "v_bytes",
    "chunk_bytes",
)
_STR_FIELDS = ("layout_fingerprint", "dtype", "request_id", "checksum")
_ALL_FIELDS = frozenset((*_INT_FIELDS, *_STR_FIELDS, "chunk_checksums", "meta", "v"))


@dataclass(frozen=True)
class KVHeader:
    """Describes one transfer of tokens [begin, end) of a sequence, layers [first_layer, first_layer + num_layers);
    consistent by construction (validated).

    Three kinds: the whole model's layers (first_layer 0, every layer: imported at once); a *part* (some layers: a
    pipeline stage's, held by the receiver until committed); a *manifest* (no layers, no bytes: "the parts of
    these tokens went to your stages; commit them", with the meta a whole payload would carry)."""

    layout_fingerprint: str  # model + KV layout hash; the receiver rejects a mismatch
    dtype: str  # "float32" | "float16"
    page_size: int
    first_layer: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    begin: int
    end: int
    k_bytes: int
    v_bytes: int
    chunk_bytes: int
    chunk_checksums: tuple[int, ...]  # one per chunk, K chunks then V chunks
    request_id: str
    checksum: str = "xxh3_64"  # kind of `chunk_checksums`: a key of HOST_CHECKSUMS
    meta: bytes = b""  # the application's own bytes (never read here), at most MAX_META_BYTES

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_tokens(self) -> int:
        return self.end - self.begin

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape of each of K and V: [layers, end-begin, kv_heads, head_dim]."""
        return (self.num_layers, self.num_tokens, self.num_kv_heads, self.head_dim)

    @property
    def total_bytes(self) -> int:
        return self.k_bytes + self.v_bytes

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)

    @property
    def is_manifest(self) -> bool:
        return self.num_layers == 0

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer's K (or V): [end-begin, kv_heads, head_dim] (0 for a manifest)."""
        return self.k_bytes // self.num_layers if self.num_layers else 0

    @property
    def slab_aligned(self) -> bool:
        """Whether every chunk holds whole layers (the receiver can use them in place); a manifest has none."""
        return self.num_layers == 0 or self.chunk_bytes % self.layer_bytes == 0

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_checksums)

    def chunk_spans(self) -> list[tuple[int, int]]:
        """(offset into the k||v byte stream, size) of every chunk, in order."""
        spans: list[tuple[int, int]] = []
        for base, n in ((0, self.k_bytes), (self.k_bytes, self.v_bytes)):
            spans.extend((base + off, min(self.chunk_bytes, n - off)) for off in range(0, n, self.chunk_bytes))
        return spans

    def to_bytes(self) -> bytes:
        """msgpack map (string keys, with a format version ``v``)."""
        d: dict[str, object] = {name: getattr(self, name) for name in (*_STR_FIELDS, *_INT_FIELDS)}
        d["chunk_checksums"] = list(self.chunk_checksums)
        d["meta"] = self.meta
        d["v"] = FORMAT_VERSION
        return msgpack.packb(d, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> KVHeader:
        """Parse and validate; anything malformed raises `PayloadError(MALFORMED, ...)`."""
        if len(data) > MAX_HEADER_BYTES:
            raise PayloadError(ErrorCode.MALFORMED, f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
        try:
            d = msgpack.unpackb(
                data,
                raw=False,
                use_list=True,
                strict_map_key=True,
                max_str_len=MAX_STR_LEN,
                max_bin_len=MAX_META_BYTES,
                max_array_len=MAX_HEADER_BYTES,
                max_map_len=64,
                max_ext_len=0,
            )
        except Exception as e:  # msgpack raises a variety (ExtraData, ValueError, UnicodeDecodeError, ...)
            raise PayloadError(ErrorCode.MALFORMED, f"header is not valid msgpack: {type(e).__name__}: {e}") from None
        if not isinstance(d, dict):
            raise PayloadError(ErrorCode.MALFORMED, f"header must be a map, got {type(d).__name__}")
        if d.get("v") != FORMAT_VERSION or type(d.get("v")) is not int:
            raise PayloadError(
                ErrorCode.MALFORMED, f"unsupported header version {d.get('v')!r} (want {FORMAT_VERSION})"
            )
        if set(d) != _ALL_FIELDS:
            missing, extra = sorted(_ALL_FIELDS - set(d)), sorted(set(d) - _ALL_FIELDS)
            raise PayloadError(ErrorCode.MALFORMED, f"header fields: missing {missing}, unexpected {extra}")
        for name in _STR_FIELDS:
            if type(d[name]) is not str:
                raise PayloadError(ErrorCode.MALFORMED, f"header field {name} must be a string")
        for name in _INT_FIELDS:
            if type(d[name]) is not int:  # rejects bool and float
                raise PayloadError(ErrorCode.MALFORMED, f"header field {name} must be an integer")
        sums = d["chunk_checksums"]
        if not isinstance(sums, list) or any(type(c) is not int for c in sums):
            raise PayloadError(ErrorCode.MALFORMED, "header field chunk_checksums must be a list of integers")
        if type(d["meta"]) is not bytes:
            raise PayloadError(ErrorCode.MALFORMED, "header field meta must be bytes")
        fields = {name: d[name] for name in (*_STR_FIELDS, *_INT_FIELDS)}
        return cls(**fields, chunk_checksums=tuple(sums), meta=d["meta"])  # type: ignore[arg-type]


def _validate(h: KVHeader) -> None:
    """Value checks shared by construction and parsing (types are checked by `from_bytes`)."""

    def bad(msg: str) -> PayloadError:
        return PayloadError(ErrorCode.MALFORMED, msg)

    if not h.layout_fingerprint or len(h.layout_fingerprint) > MAX_STR_LEN:
        raise bad("layout_fingerprint must be a non-empty string of at most 256 characters")
    if len(h.request_id) > MAX_STR_LEN:
        raise bad("request_id longer than 256 characters")
    if h.dtype not in DTYPE_SIZES:
        raise bad(f"dtype {h.dtype!r} not one of {sorted(DTYPE_SIZES)}")
    for name in ("page_size", "num_kv_heads", "head_dim"):
        if getattr(h, name) <= 0:
            raise bad(f"{name} must be positive, got {getattr(h, name)}")
    if h.first_layer < 0 or h.num_layers < 0:
        raise bad(f"layers [{h.first_layer}, {h.first_layer + h.num_layers}) must not be negative")
    if not 0 <= h.begin < h.end:
        raise bad(f"token range [{h.begin}, {h.end}) is empty or negative")
    want = h.num_layers * h.num_tokens * h.num_kv_heads * h.head_dim * DTYPE_SIZES[h.dtype]
    if h.k_bytes != want or h.v_bytes != want:
        raise bad(f"k_bytes/v_bytes {h.k_bytes}/{h.v_bytes} do not match shape {h.shape} {h.dtype} ({want} bytes)")
    if not 0 < h.chunk_bytes <= MAX_CHUNK_BYTES:
        raise bad(f"chunk_bytes {h.chunk_bytes} outside (0, {MAX_CHUNK_BYTES}]")
    n = _num_chunks(h.k_bytes, h.chunk_bytes) + _num_chunks(h.v_bytes, h.chunk_bytes)
    if len(h.chunk_checksums) != n:
        raise bad(f"{len(h.chunk_checksums)} chunk checksums for {n} chunks")
    if any(not 0 <= c < 1 << 64 for c in h.chunk_checksums):
        raise bad("chunk_checksums values must be unsigned 64-bit")
    if h.checksum not in HOST_CHECKSUMS:
        raise bad(f"checksum {h.checksum!r} not one of {sorted(HOST_CHECKSUMS)}")
    if len(h.meta) > MAX_META_BYTES:
        raise bad(f"meta of {len(h.meta)} bytes exceeds {MAX_META_BYTES}")


@dataclass(frozen=True)
class KVPayload:
    """A header plus the K and V it describes; the payload references (does not copy) the caller's arrays."""

    header: KVHeader
    k: np.ndarray  # [layers, end-begin, kv_heads, head_dim], C-contiguous, header.dtype
    v: np.ndarray  # same shape and dtype as k


def make_payload(
    k: np.ndarray,
    v: np.ndarray,
    fingerprint: str,
    begin: int,
    request_id: str,
    chunk_bytes: int | None = None,
    page_size: int = 16,
    meta: bytes = b"",
    first_layer: int = 0,
) -> KVPayload:
    """Build a payload for tokens [begin, begin + k.shape[1]): computes sizes and per-chunk XXH3-64 checksums.
    `chunk_bytes` None: whole layer slabs of about 1 MiB (`layer_chunk_bytes`), which the receiver uses in place.
    `first_layer`: the model layer of k[0] (a part of a pipeline stage's layers; 0 for the whole model).

    k, v: [layers, n_tokens, kv_heads, head_dim] in float32/float16 (K already rotated). Non-contiguous arrays are
    copied once to C order; contiguous ones are referenced, so the caller must not modify them until sent.
    """
    if k.ndim != 4 or k.shape != v.shape or k.shape[1] == 0:
        raise ValueError(f"make_payload: k and v must share a non-empty [L, n, Hkv, d] shape, got {k.shape}, {v.shape}")
    if k.dtype != v.dtype or str(k.dtype) not in DTYPE_SIZES:
        raise ValueError(f"make_payload: dtype must be one of {sorted(DTYPE_SIZES)} for both, got {k.dtype}/{v.dtype}")
    k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
    chunk_bytes = chunk_bytes or layer_chunk_bytes(k.nbytes // k.shape[0])
    sums = [chunk_checksum(c) for arr in (k, v) for c in _array_chunks(arr, chunk_bytes)]
    header = build_header(
        k.shape,
        str(k.dtype),
        fingerprint,
        begin,
        request_id,
        chunk_bytes,
        page_size,
        sums,
        meta=meta,
        first_layer=first_layer,
    )
    return KVPayload(header, k, v)


def make_manifest(
    fingerprint: str,
    dtype: str,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    begin: int,
    end: int,
    request_id: str,
    meta: bytes = b"",
) -> KVPayload:
    """A manifest for tokens [begin, end) of `request_id` (no layers, no bytes): sent to a decode worker once every
    part of those tokens reached its endpoints (`kvtransfer.route`), it commits them there."""
    shape = (0, end - begin, num_kv_heads, head_dim)
    header = build_header(shape, dtype, fingerprint, begin, request_id, 1, page_size, [], meta=meta)
    empty = np.empty(shape, dtype)
    return KVPayload(header, empty, empty)


def build_header(
    shape: tuple[int, ...],
    dtype: str,
    fingerprint: str,
    begin: int,
    request_id: str,
    chunk_bytes: int,
    page_size: int,
    checksums: list[int],
    checksum: str = "xxh3_64",
    meta: bytes = b"",
    first_layer: int = 0,
) -> KVHeader:
    """The header of K and V of `shape` [layers, n_tokens, kv_heads, head_dim] each, for tokens [begin, begin + n)
    of layers [first_layer, first_layer + layers)."""
    layers, n, heads, head_dim = shape
    nbytes = layers * n * heads * head_dim * DTYPE_SIZES[dtype]
    return KVHeader(
        layout_fingerprint=fingerprint,
        dtype=dtype,
        page_size=page_size,
        first_layer=first_layer,
        num_layers=layers,
        num_kv_heads=heads,
        head_dim=head_dim,
        begin=begin,
        end=begin + n,
        k_bytes=nbytes,
        v_bytes=nbytes,
        chunk_bytes=chunk_bytes,
        chunk_checksums=tuple(checksums),
        request_id=request_id,
        checksum=checksum,
        meta=meta,
    )


def _array_chunks(a: np.ndarray, chunk_bytes: int) -> Iterator[memoryview]:
    if a.size == 0:  # a manifest's: no chunks
        return
    flat = memoryview(a).cast("B")  # zero-copy byte view of a C-contiguous array
    for off in range(0, len(flat), chunk_bytes):
        yield flat[off : off + chunk_bytes]


def iter_chunks(payload: KVPayload) -> Iterator[memoryview]:
    """Zero-copy byte views of K's chunks then V's chunks (never straddling); valid while the payload lives."""
    cb = payload.header.chunk_bytes
    yield from _array_chunks(payload.k, cb)
    yield from _array_chunks(payload.v, cb)


ShapeCheck = Callable[[KVHeader], str | None]
"""Receiver-side check of a header's geometry: returns None to accept, or the reason for SHAPE_MISMATCH."""


def expect_shape(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int | None = None,
    max_tokens: int | None = None,
    *,
    first_layer: int = 0,
    parts: bool = False,
    manifests: bool = False,
) -> ShapeCheck:
    """A `ShapeCheck` for a receiver holding layers [first_layer, first_layer + num_layers) of a fixed geometry;
    `max_tokens` bounds `end` (e.g. the context window). A payload must carry exactly those layers, or with `parts`
    any of them (a pipeline stage's part), or with `manifests` none (a manifest)."""
    held = range(first_layer, first_layer + num_layers)

    def check(h: KVHeader) -> str | None:
        want, got = (num_kv_heads, head_dim), (h.num_kv_heads, h.head_dim)
        if got != want:
            return f"(kv_heads, head_dim) {got} != expected {want}"
        if h.is_manifest:
            if not manifests:
                return "a manifest (no layers) is taken only by a decode worker that gets parts"
        elif h.layers != held and not (parts and h.first_layer >= held.start and h.layers.stop <= held.stop):
            kind = "a part of" if parts else "exactly"
            return (
                f"layers [{h.layers.start}, {h.layers.stop}) are not {kind} this receiver's [{held.start}, {held.stop})"
            )
        if page_size is not None and h.page_size != page_size:
            return f"page_size {h.page_size} != expected {page_size}"
        if max_tokens is not None and h.end > max_tokens:
            return f"token range end {h.end} exceeds {max_tokens}"
        return None

    return check


def _kv_name(storage_dtype: str) -> str:
    """A payload's element dtype as the `--kv-cache-dtype` it comes from (int8 rows are q8_0 blocks)."""
    return "q8_0" if storage_dtype == "int8" else storage_dtype


def check_header(
    header: KVHeader,
    expected_fingerprint: str | None,
    expected_dtype: str | None,
    expected_shape_fn: ShapeCheck | None = None,
    max_total_bytes: int | None = None,
) -> None:
    """Raise `PayloadError` unless this receiver can take `header` (dtype, fingerprint, geometry, size). The dtype
    comes first: the fingerprint covers it too, and a KV cache dtype mismatch deserves an error that names both."""
    if expected_dtype is not None and header.dtype != expected_dtype:
        raise PayloadError(
            ErrorCode.DTYPE_MISMATCH,
            f"KV cache dtype mismatch: the sender's KV is {_kv_name(header.dtype)}, this receiver's cache is "
            f"{_kv_name(expected_dtype)} (serve both sides with the same --kv-cache-dtype)",
        )
    if expected_fingerprint is not None and header.layout_fingerprint != expected_fingerprint:
        raise PayloadError(
            ErrorCode.FINGERPRINT_MISMATCH,
            f"layout fingerprint {header.layout_fingerprint!r} != receiver's {expected_fingerprint!r}",
        )
    if expected_shape_fn is not None and (why := expected_shape_fn(header)) is not None:
        raise PayloadError(ErrorCode.SHAPE_MISMATCH, why)
    if max_total_bytes is not None and header.total_bytes > max_total_bytes:
        raise PayloadError(ErrorCode.SHAPE_MISMATCH, f"payload of {header.total_bytes} bytes exceeds {max_total_bytes}")


class LayerSlabs:
    """K or V of a received payload, [layers, n, kv_heads, head_dim], as one [n, kv_heads, head_dim] view per
    layer into the received chunks: no copy is made (the views keep the chunks alive; they are read-only).

    Index it by layer, as an import does; `np.asarray(slabs)` makes one contiguous copy."""

    ndim = 4

    def __init__(self, chunks: list[memoryview], header: KVHeader) -> None:
        per_layer = (header.num_tokens, header.num_kv_heads, header.head_dim)
        self._layers = [a for c in chunks for a in np.frombuffer(c, dtype=header.dtype).reshape(-1, *per_layer)]
        self.shape = header.shape
        self.dtype = np.dtype(header.dtype)
        if len(self._layers) != header.num_layers:
            raise PayloadError(ErrorCode.MALFORMED, f"{len(self._layers)} layer slabs for {header.num_layers} layers")

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, layer: int) -> np.ndarray:
        return self._layers[layer]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = np.stack(self._layers)
        return out if dtype is None else out.astype(dtype)


class PayloadAssembler:
    """Receives one payload's chunks in order and hands back (k, v).

    Slab-aligned payloads (`KVHeader.slab_aligned`) are kept as the received chunks and come back as `LayerSlabs`
    views (zero-copy); others are copied into one preallocated buffer and come back as array views of it.
    Construction validates the header against the receiver (fingerprint, dtype, then `expected_shape_fn`) and
    raises `PayloadError` before anything is allocated. Call `add` once per chunk in index order, then `finish`.
    The chunks handed to `add` must not be mutated afterwards (gRPC's message bytes are immutable).
    """

    def __init__(
        self,
        header: KVHeader,
        expected_fingerprint: str | None,
        expected_dtype: str | None,
        expected_shape_fn: ShapeCheck | None = None,
        max_total_bytes: int | None = None,
    ) -> None:
        check_header(header, expected_fingerprint, expected_dtype, expected_shape_fn, max_total_bytes)
        self.header = header
        self._checksum = HOST_CHECKSUMS[header.checksum]
        self._spans = header.chunk_spans()
        self._chunks: list[memoryview] | None = [] if header.slab_aligned else None
        self._buf = None if header.slab_aligned else np.empty(header.total_bytes, dtype=np.uint8)  # [k||v bytes]
        self._next = 0
        self.bytes_received = 0

    @property
    def complete(self) -> bool:
        return self._next == len(self._spans)

    def add(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Verify chunk `index` (order, size, checksum); keep it (slab-aligned) or copy it into the buffer."""
        if index >= len(self._spans):
            raise PayloadError(ErrorCode.MALFORMED, f"extra data: chunk {index} beyond {len(self._spans)} chunks")
        if index != self._next:
            raise PayloadError(ErrorCode.MALFORMED, f"chunk {index} out of order (expected {self._next})")
        off, size = self._spans[index]
        if len(data) != size:
            raise PayloadError(ErrorCode.MALFORMED, f"chunk {index} has {len(data)} bytes, expected {size}")
        if self._checksum(data) != self.header.chunk_checksums[index]:
            raise PayloadError(ErrorCode.CHECKSUM_MISMATCH, f"chunk {index} fails its {self.header.checksum} check")
        if self._chunks is not None:
            self._chunks.append(memoryview(data))
        else:
            self._buf[off : off + size] = np.frombuffer(data, dtype=np.uint8)
        self._next += 1
        self.bytes_received += size

    def finish(self) -> tuple[np.ndarray | LayerSlabs, np.ndarray | LayerSlabs]:
        """(k, v) [layers, end-begin, kv_heads, head_dim]: `LayerSlabs` over the chunks, or views of the buffer;
        TRUNCATED if chunks are missing."""
        if not self.complete:
            raise PayloadError(
                ErrorCode.TRUNCATED,
                f"stream ended after {self._next} of {len(self._spans)} chunks "
                f"({self.bytes_received} of {self.header.total_bytes} bytes)",
            )
        h = self.header
        if self._chunks is not None:
            nk = _num_chunks(h.k_bytes, h.chunk_bytes)
            return LayerSlabs(self._chunks[:nk], h), LayerSlabs(self._chunks[nk:], h)
        assert self._buf is not None
        k = self._buf[: h.k_bytes].view(h.dtype).reshape(h.shape)
        v = self._buf[h.k_bytes :].view(h.dtype).reshape(h.shape)
        return k, v
