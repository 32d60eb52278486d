"""Export a sequence's KV from a `ModelRuntime` into a `KVPayload`, and import payloads into another runtime.

Both sides touch the paged KV cache, which has no locking: they must run between model steps on the thread
that drives the runtime. `export_payload` is called on the prefill worker's model thread; `RuntimeImporter` is the
decode side's `ImportSink`: transport threads call it, and it hands the write to the model thread through the
`run_on_model_thread` callable it was given, blocking until done.

Partial ranges: a payload for tokens [begin, end) lands on a sequence that already holds exactly `begin` tokens
(a shared prefix, or the tokens the decode side computed itself). `begin == 0` creates the sequence.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from typing import Any

import numpy as np

from kvtransfer.auth import InternalTLS
from kvtransfer.grpc_transport import GrpcKVReceiver, GrpcKVSender
from kvtransfer.nccl_transport import (
    CupyNccl,
    NcclKVReceiver,
    NcclKVSender,
    RoutedSender,
    make_device_payload,
    nccl_available,
)
from kvtransfer.payload import (
    DEFAULT_CHUNK_BYTES,
    ErrorCode,
    KVHeader,
    KVPayload,
    PayloadError,
    expect_shape,
    make_manifest,
    make_payload,
)
from kvtransfer.route import KVParts, KVRoute, PushesKV, Scatter, push_parts
from kvtransfer.transport import ImportSink, KVReceiver, KVSender
from llama_relax.runtime import ModelRuntime

_KDL_CUDA = 2


def export_payload(
    runtime: ModelRuntime,
    seq_id: int,
    request_id: str,
    begin: int = 0,
    end: int | None = None,
    chunk_bytes: int | None = None,
    meta: bytes = b"",
) -> KVPayload:
    """K/V of tokens [begin, end) of `seq_id` (default: all) as a payload owning fresh host arrays."""
    end = runtime.sequence_length(seq_id) if end is None else end
    k, v = runtime.read_kv(seq_id, begin, end)  # [L, n, Hkv, d] each
    return _host_payload(runtime, k, v, begin, request_id, chunk_bytes, meta)


def _host_payload(
    runtime: ModelRuntime,
    k: np.ndarray,
    v: np.ndarray,
    begin: int,
    request_id: str,
    chunk_bytes: int | None,
    meta: bytes,
) -> KVPayload:
    return make_payload(
        k, v, runtime.kv_fingerprint(), begin, request_id, chunk_bytes, runtime.kv_config.page_size, meta
    )


def export_device_payload(
    runtime: ModelRuntime,
    sender: NcclKVSender,
    seq_id: int,
    request_id: str,
    begin: int = 0,
    end: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    meta: bytes = b"",
) -> KVPayload:
    """K/V of tokens [begin, end) of `seq_id` read on the GPU and handed to the NCCL sender's backend zero-copy."""
    end = runtime.sequence_length(seq_id) if end is None else end
    kt, vt = runtime.read_kv_device(seq_id, begin, end)  # [L, n, Hkv, d] each, on the device
    xp = sender.backend.xp
    return make_device_payload(
        sender.backend,
        xp.from_dlpack(kt),
        xp.from_dlpack(vt),
        runtime.kv_fingerprint(),
        begin,
        request_id,
        chunk_bytes,
        runtime.kv_config.page_size,
        meta,
    )


def _device_route(sender: KVSender, target: str) -> NcclKVSender | None:
    if isinstance(sender, RoutedSender) and sender.nccl is not None and sender.uses_nccl(target):
        return sender.nccl
    return None


def export_for(
    runtime: ModelRuntime,
    sender: KVSender,
    target: str,
    seq_id: int,
    request_id: str,
    meta: bytes = b"",
    begin: int = 0,
    end: int | None = None,
) -> KVPayload:
    """The payload of tokens [begin, end) `sender` will move to `target` best: on the device for the NCCL path,
    else in host memory."""
    if (nccl := _device_route(sender, target)) is not None:
        return export_device_payload(runtime, nccl, seq_id, request_id, begin=begin, end=end, meta=meta)
    return export_payload(runtime, seq_id, request_id, begin=begin, end=end, meta=meta)


def streams_to(runtime: ModelRuntime, sender: KVSender, target: str) -> bool:
    """Whether KV for `target` can be read off the driver thread (host pages, host transport, or stages that send
    their own): only then is it worth sending a prompt's KV in pieces while later chunks compute."""
    if isinstance(runtime, PushesKV):
        return True
    return runtime.host_kv and _device_route(sender, target) is None


def scatters_to(runtime: ModelRuntime, route: KVRoute) -> bool:
    """Whether KV for `route` moves as parts plus a manifest (`kvtransfer.route`): the decode side's layers sit in
    stages, or this side's do; else as whole payloads."""
    return bool(route.endpoints) or isinstance(runtime, PushesKV)


def scatter_later(
    runtime: ModelRuntime,
    sender: KVSender,
    pool: cf.Executor,
    seq_id: int,
    request_id: str,
    begin: int,
    end: int,
    meta: bytes = b"",
) -> Callable[[], Scatter]:
    """A builder of the `Scatter` of tokens [begin, end), called once on any thread. Driver thread only.

    Stages (`PushesKV`) read and send their own layers when pushed. A one-process runtime reads the token
    positions now (host pages; else it reads the KV now) and gathers on the builder's thread; the parts go on
    `pool`."""
    if isinstance(runtime, PushesKV):
        scatter = Scatter(begin, end, meta, lambda route, t: runtime.push_kv(seq_id, request_id, begin, end, route, t))
        return lambda: scatter
    fp, page, layers = runtime.kv_fingerprint(), runtime.kv_config.page_size, runtime.num_kv_layers

    def scatter_of(k: np.ndarray, v: np.ndarray) -> Scatter:
        def push(route: KVRoute, timeout_s: float):
            return push_parts(sender, pool, k, v, 0, layers, begin, request_id, fp, page, route, timeout_s)

        return Scatter(begin, end, meta, push)

    if not runtime.host_kv:
        ready = scatter_of(*runtime.read_kv(seq_id, begin, end))
        return lambda: ready
    positions = runtime.kv_positions(seq_id, begin, end)  # [n]
    return lambda: scatter_of(*runtime.gather_kv(positions))


def manifest_for(runtime: ModelRuntime, begin: int, end: int, request_id: str, meta: bytes = b"") -> KVPayload:
    """The manifest that commits the parts of tokens [begin, end) on the decode side."""
    c = runtime.config
    return make_manifest(
        runtime.kv_fingerprint(),
        runtime.kv_elem,
        c.num_key_value_heads,
        runtime.kv_row,
        runtime.kv_config.page_size,
        begin,
        end,
        request_id,
        meta,
    )


def export_later(
    runtime: ModelRuntime,
    sender: KVSender,
    target: str,
    seq_id: int,
    request_id: str,
    begin: int,
    end: int,
    meta: bytes = b"",
    chunk_bytes: int | None = None,
) -> Callable[[], KVPayload]:
    """A builder of the payload of tokens [begin, end), called once on any thread. Driver thread only.

    Where `streams_to(...)`, only the token positions are read now; the builder gathers from the host pages and
    checksums on its own thread (the caller keeps the sequence alive until it ran). Otherwise the KV is exported
    now and the builder hands that payload over."""
    if not streams_to(runtime, sender, target):
        payload = export_for(runtime, sender, target, seq_id, request_id, meta, begin, end)
        return lambda: payload
    positions = runtime.kv_positions(seq_id, begin, end)  # [n]
    return lambda: _host_payload(runtime, *runtime.gather_kv(positions), begin, request_id, chunk_bytes, meta)


def _cuda_id(runtime: ModelRuntime) -> int | None:
    dev = runtime.device
    return dev.index if dev.dlpack_device_type() == _KDL_CUDA else None


def make_sender(runtime: ModelRuntime, token: str = "", tls: InternalTLS | None = None) -> RoutedSender:
    """A prefill worker's sender: NCCL to "nccl://" targets when its KV is on CUDA and NCCL works, else gRPC;
    every call carries the cluster `token`, over TLS with `tls`."""
    dev = _cuda_id(runtime)
    nccl = NcclKVSender(CupyNccl(dev), token=token, tls=tls) if dev is not None and nccl_available() else None
    return RoutedSender(GrpcKVSender(token=token, tls=tls), nccl)


def make_receiver(
    runtime: ModelRuntime,
    sink: ImportSink,
    host: str,
    port: int,
    on_orphaned: Callable[[KVHeader], None],
    token: str = "",
    tls: InternalTLS | None = None,
) -> tuple[KVReceiver, str]:
    """A decode worker's started receiver and the target it publishes: "nccl://host:port" (NCCL, plus the host
    Push) when its KV is on CUDA and NCCL works, else a gRPC receiver's "host:port". With `token`, every call
    without the cluster token is refused (UNAUTHENTICATED, nothing read)."""
    dev = _cuda_id(runtime)
    checks = receiver_checks(runtime)
    if dev is not None and nccl_available():
        rx = NcclKVReceiver(sink, host, port, CupyNccl(dev), on_orphaned=on_orphaned, token=token, tls=tls, **checks)
        rx.start()
        return rx, rx.advertised
    grx = GrpcKVReceiver(sink, host=host, port=port, on_orphaned=on_orphaned, token=token, tls=tls, **checks)
    return grx, grx.start()


def receiver_checks(
    runtime: ModelRuntime, *, stage_layers: range | None = None, fingerprint: str | None = None
) -> dict[str, Any]:
    """Keyword arguments for a `KVReceiver` that make it reject payloads this runtime cannot take: whole payloads
    and manifests; parts too when its layers are here (a stage runtime's parts go to its stages). A pipeline
    stage's own receiver (`stage_layers`, with the whole model's `fingerprint`, which one stage cannot compute)
    takes parts of its layers only."""
    c = runtime.config
    layers = range(c.num_hidden_layers) if stage_layers is None else stage_layers
    return {
        "expected_fingerprint": fingerprint or runtime.kv_fingerprint(),
        "expected_dtype": runtime.kv_elem,
        "shape_check": expect_shape(
            len(layers),
            c.num_key_value_heads,
            runtime.kv_row,
            runtime.kv_config.page_size,
            c.context_window_size,
            first_layer=layers.start,
            parts=stage_layers is not None or not isinstance(runtime, PushesKV),
            manifests=stage_layers is None,
        ),
    }


def import_into(runtime: ModelRuntime, seq_id: int, header: KVHeader, k: np.ndarray, v: np.ndarray) -> None:
    """Append the payload's tokens to `seq_id` (creating it when `header.begin == 0`). Model thread only.

    Leaves the cache as it was on any validation error; a sequence created here is removed if the write fails."""
    exists = seq_id in runtime.sequence_ids()
    if header.begin == 0 and exists and runtime.sequence_length(seq_id) != 0:
        raise PayloadError(ErrorCode.SHAPE_MISMATCH, f"sequence {seq_id} already holds tokens; payload starts at 0")
    if header.begin > 0:
        if not exists:
            raise PayloadError(
                ErrorCode.SHAPE_MISMATCH, f"payload starts at {header.begin} but sequence {seq_id} is absent"
            )
        have = runtime.sequence_length(seq_id)
        if have != header.begin:
            raise PayloadError(
                ErrorCode.SHAPE_MISMATCH, f"payload starts at {header.begin}; sequence {seq_id} holds {have}"
            )
    created = not exists
    if created:
        runtime.add_sequence(seq_id)
    try:
        runtime.append_kv(seq_id, k, v)
    except BaseException:
        if created and seq_id in runtime.sequence_ids():
            runtime.remove_sequence(seq_id)
        raise


class LocalLanding:
    """Where a one-process decode worker's KV parts wait for their manifest (`kvtransfer.route`): `hold` keeps a
    part, `commit` imports the piece's parts into a sequence (model thread), `drop` forgets a request's parts."""

    def __init__(self, runtime: ModelRuntime, max_bytes: int, ttl_s: float) -> None:
        self.runtime = runtime
        self.parts = KVParts(range(runtime.num_kv_layers), max_bytes, ttl_s)

    def hold(self, header: KVHeader, k, v) -> None:
        self.parts.add(header, k, v)

    def commit(self, seq_id: int, header: KVHeader) -> None:
        """Import the parts of `header`'s tokens (all layers held, or TRUNCATED and nothing changes)."""
        self.parts.check(header.request_id, header.begin, header.end)
        have = self.runtime.sequence_length(seq_id)
        if have != header.begin:  # (before the parts are taken: a refused commit keeps them)
            raise PayloadError(
                ErrorCode.SHAPE_MISMATCH, f"payload starts at {header.begin}; sequence {seq_id} holds {have}"
            )
        import_into(self.runtime, seq_id, header, *self.parts.take(header.request_id, header.begin, header.end))

    def drop(self, request_id: str) -> None:
        self.parts.drop(request_id)


class RuntimeImporter:
    """`ImportSink` for a decode worker: resolves the request to a sequence id and imports on the model thread.

    `resolve_seq(request_id) -> seq_id` raises (e.g. KeyError) for requests the worker did not reserve;
    `run_on_model_thread(fn)` runs `fn` on the thread driving the runtime and returns/raises what it does."""

    def __init__(
        self,
        runtime: ModelRuntime,
        resolve_seq: Callable[[str], int],
        run_on_model_thread: Callable[[Callable[[], None]], None] = lambda fn: fn(),
    ) -> None:
        self.runtime = runtime
        self.resolve_seq = resolve_seq
        self.run_on_model_thread = run_on_model_thread

    def __call__(self, header: KVHeader, k: np.ndarray, v: np.ndarray) -> None:
        seq_id = self.resolve_seq(header.request_id)
        self.run_on_model_thread(lambda: import_into(self.runtime, seq_id, header, k, v))

    def on_orphaned(self, header: KVHeader) -> None:
        """The sender went away while we imported (cancel/timeout): drop what was imported. Pass this as the
        receiver's `on_orphaned` so a cancelled transfer leaves no pages behind."""
        seq_id = self.resolve_seq(header.request_id)

        def drop() -> None:
            if header.begin == 0:
                self.runtime.remove_sequence(seq_id)
            elif seq_id in self.runtime.sequence_ids():
                self.runtime.popn(seq_id, self.runtime.sequence_length(seq_id) - header.begin)

        self.run_on_model_thread(drop)
