"""kvtransfer.payload: header wire format and validation, chunking, and the verifying assembler."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import xxhash

from kvtransfer.payload import (
    ErrorCode,
    KVHeader,
    LayerSlabs,
    PayloadAssembler,
    PayloadError,
    expect_shape,
    iter_chunks,
    layer_chunk_bytes,
    make_payload,
)


def _kv(shape=(2, 5, 2, 8), dtype=np.float32, seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)


def _payload(chunk_bytes=96, **kw):
    k, v = _kv(**kw)
    return make_payload(k, v, "fp-1", 3, "req-1", chunk_bytes=chunk_bytes)


def _assemble(payload, chunks=None):
    asm = PayloadAssembler(payload.header, "fp-1", payload.header.dtype, None)
    for i, c in enumerate(chunks if chunks is not None else iter_chunks(payload)):
        asm.add(i, c)
    return asm


def test_header_round_trip():
    for dtype in (np.float32, np.float16):
        h = _payload(dtype=dtype).header
        assert KVHeader.from_bytes(h.to_bytes()) == h
        assert h.dtype == np.dtype(dtype).name
        assert (h.begin, h.end, h.shape) == (3, 8, (2, 5, 2, 8))
    k, v = _kv()
    with_meta = make_payload(k, v, "fp-1", 0, "req-m", meta=b"\x00token\xff").header
    assert KVHeader.from_bytes(with_meta.to_bytes()).meta == b"\x00token\xff"


def test_make_payload_sizes_and_chunks_do_not_straddle():
    p = _payload(chunk_bytes=96)  # k_bytes = 2*5*2*8*4 = 640 -> 7 chunks (6x96 + 64) per array
    h = p.header
    assert h.k_bytes == h.v_bytes == 640 and h.num_chunks == 14
    chunks = list(iter_chunks(p))
    assert [len(c) for c in chunks] == [96] * 6 + [64] + [96] * 6 + [64]
    assert b"".join(chunks) == p.k.tobytes() + p.v.tobytes()
    assert [xxhash.xxh3_64_intdigest(bytes(c)) for c in chunks] == list(h.chunk_checksums)
    assert chunks[0].obj is p.k and chunks[-1].obj is p.v  # zero-copy views of the arrays
    assert [s for _, s in h.chunk_spans()] == [len(c) for c in chunks]
    assert h.chunk_spans()[7][0] == h.k_bytes


def test_make_payload_rejects_bad_arrays_and_copies_noncontiguous():
    k, v = _kv()
    with pytest.raises(ValueError):
        make_payload(k, v[:, :4], "fp", 0, "r")
    with pytest.raises(ValueError):
        make_payload(k.astype(np.float64), v.astype(np.float64), "fp", 0, "r")
    with pytest.raises(ValueError):
        make_payload(k, v.astype(np.float16), "fp", 0, "r")
    kt = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # same shape, not C-contiguous
    p = make_payload(kt, v, "fp", 0, "r")
    assert p.k.flags.c_contiguous and np.array_equal(p.k, k)


def _raw_header(**overrides) -> bytes:
    d = msgpack.unpackb(_payload().header.to_bytes())
    d.update(overrides)
    return msgpack.packb({k: v for k, v in d.items() if v is not _DROP})


_DROP = object()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1garbage",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 1}),
        _raw_header()[:-3],  # cut short
        _raw_header() + b"\x00",  # trailing bytes
        _raw_header(v=1),  # the CRC32 format before XXH3
        _raw_header(v=2),  # XXH3 chunks but no `meta`
        _raw_header(v=3),  # meta but no layer range
        _raw_header(v=5),
        _raw_header(first_layer=-1),
        _raw_header(first_layer=_DROP),
        _raw_header(num_layers=-2),
        _raw_header(meta="first token"),  # must be bytes
        _raw_header(meta=b"x" * (65 << 10)),
        _raw_header(v=True),
        _raw_header(extra=1),
        _raw_header(request_id=_DROP),
        _raw_header(num_layers=True),
        _raw_header(num_layers=2.0),
        _raw_header(num_layers="2"),
        _raw_header(layout_fingerprint=b"fp-1"),
        _raw_header(layout_fingerprint=""),
        _raw_header(dtype="float64"),
        _raw_header(page_size=0),
        _raw_header(begin=-1),
        _raw_header(end=3),  # empty range
        _raw_header(k_bytes=639),
        _raw_header(chunk_bytes=0),
        _raw_header(chunk_checksums=[1, 2]),
        _raw_header(chunk_checksums=[-1] * 14),
        _raw_header(chunk_checksums="x"),
        _raw_header(request_id="r" * 300),
        b"\x00" * (2 << 20),
    ],
)
def test_malformed_header_bytes(data):
    with pytest.raises(PayloadError) as e:
        KVHeader.from_bytes(data)
    assert e.value.code == ErrorCode.MALFORMED


def test_header_construction_validates():
    h = _payload().header
    with pytest.raises(PayloadError):
        KVHeader(**{**h.__dict__, "v_bytes": 1})


def test_assembler_returns_views_of_one_buffer():
    p = _payload()
    k, v = _assemble(p).finish()
    assert np.array_equal(k, p.k) and np.array_equal(v, p.v)
    assert k.dtype == p.k.dtype and k.shape == p.header.shape
    assert not np.shares_memory(k, p.k)
    assert v.ctypes.data == k.ctypes.data + p.header.k_bytes  # v follows k in the same allocation


def test_layer_chunk_bytes_holds_whole_layers():
    assert layer_chunk_bytes(393_216) == 786_432  # 2 layers of a 512-token slab in about 1 MiB
    assert layer_chunk_bytes(1_536_000) == 1_536_000  # one layer when a slab exceeds 1 MiB
    assert layer_chunk_bytes(100 << 20) == 1 << 20  # beyond MAX_CHUNK_BYTES: plain 1 MiB chunks (copied)
    k, v = _kv(shape=(5, 7, 2, 8))
    h = make_payload(k, v, "fp-1", 0, "r").header  # default chunking: slab-aligned
    assert h.slab_aligned and h.layer_bytes == 7 * 2 * 8 * 4 and h.num_chunks == 2  # all of K in one chunk


def test_slab_aligned_payloads_are_assembled_without_a_copy():
    k, v = _kv(shape=(5, 7, 2, 8))
    p = make_payload(k, v, "fp-1", 0, "r", chunk_bytes=2 * 7 * 2 * 8 * 4)  # 2 layers per chunk: 3 chunks each
    assert p.header.slab_aligned and p.header.num_chunks == 6
    received = [bytes(c) for c in iter_chunks(p)]  # what gRPC hands the receiver: one bytes object per message
    gk, gv = _assemble(p, received).finish()
    assert isinstance(gk, LayerSlabs) and gk.shape == k.shape and gk.dtype == k.dtype and len(gk) == 5
    assert np.array_equal(np.asarray(gk), k) and np.array_equal(np.asarray(gv), v)
    for layer in range(5):
        chunk = received[layer // 2]
        assert np.shares_memory(gk[layer], np.frombuffer(chunk, np.uint8))  # a view of the message, not a copy
        assert np.array_equal(gv[layer], v[layer])
    unaligned = _payload(chunk_bytes=96)
    assert not unaligned.header.slab_aligned
    ck, _ = _assemble(unaligned).finish()
    assert isinstance(ck, np.ndarray) and np.array_equal(ck, unaligned.k)


def test_assembler_checksum_mismatch():
    p = _payload()
    chunks = [bytearray(c) for c in iter_chunks(p)]
    chunks[5][10] ^= 0x01
    asm = PayloadAssembler(p.header, "fp-1", None, None)
    for i in range(5):
        asm.add(i, chunks[i])
    with pytest.raises(PayloadError) as e:
        asm.add(5, chunks[5])
    assert e.value.code == ErrorCode.CHECKSUM_MISMATCH


def test_assembler_truncation_order_size_and_extra():
    p = _payload()
    chunks = list(iter_chunks(p))
    asm = _assemble(p, chunks[:-1])
    assert not asm.complete
    with pytest.raises(PayloadError) as e:
        asm.finish()
    assert e.value.code == ErrorCode.TRUNCATED
    asm = _assemble(p)
    with pytest.raises(PayloadError) as e:
        asm.add(len(chunks), chunks[0])
    assert e.value.code == ErrorCode.MALFORMED and "extra" in e.value.message
    asm = PayloadAssembler(p.header, None, None)
    with pytest.raises(PayloadError) as e:
        asm.add(1, chunks[1])
    assert e.value.code == ErrorCode.MALFORMED
    with pytest.raises(PayloadError) as e:
        asm.add(0, bytes(chunks[0])[:-1])
    assert e.value.code == ErrorCode.MALFORMED


def test_assembler_rejects_header_before_allocating():
    h = _payload().header
    cases = [
        (("other-fp", None, None), ErrorCode.FINGERPRINT_MISMATCH),
        ((None, "float16", None), ErrorCode.DTYPE_MISMATCH),
        ((None, None, expect_shape(2, 4, 8)), ErrorCode.SHAPE_MISMATCH),
        ((None, None, expect_shape(2, 2, 8, page_size=32)), ErrorCode.SHAPE_MISMATCH),
        ((None, None, expect_shape(2, 2, 8, max_tokens=7)), ErrorCode.SHAPE_MISMATCH),
    ]
    for args, code in cases:
        with pytest.raises(PayloadError) as e:
            PayloadAssembler(h, *args)
        assert e.value.code == code
    with pytest.raises(PayloadError) as e:
        PayloadAssembler(h, None, None, None, max_total_bytes=h.total_bytes - 1)
    assert e.value.code == ErrorCode.SHAPE_MISMATCH
    PayloadAssembler(h, "fp-1", "float32", expect_shape(2, 2, 8, page_size=16, max_tokens=8))


def test_error_code_parse():
    assert ErrorCode.parse("BUSY") is ErrorCode.BUSY
    assert ErrorCode.parse("SOMETHING_NEW") is ErrorCode.MALFORMED
