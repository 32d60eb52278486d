"""KV moved stage by stage (#28): where each layer range of a decode worker lands (`KVRoute`), the sender's
scatter of a piece into parts (`push_parts`), and the receiver's holding area for parts until the commit
(`KVParts`).

A decode worker whose layers sit in pipeline stages publishes a route: its own receiver (the commit point) plus one
receiver per stage with the stage's layers. A plain decode worker publishes just its receiver address, which holds
every layer. A piece of a request's KV (tokens [begin, end)) then moves in two steps:
  1. parts: every sender (a prefill worker, or each of its stages for its own layers) sends to every endpoint the
     layers they share, all at once; an endpoint holds each part (`KVParts`, nothing in its cache yet) and acks;
  2. the manifest (`payload.make_manifest`: no layers, the piece's meta) to the commit point, once every part is
     acked: the decode worker checks that each endpoint holds every layer of the piece, then appends them all
     (first on none, then on all: the KV is committed only when every stage holds its part) and acks.
A plain prefill worker sending to a plain decode worker skips all this: one whole payload, imported at once.

Route text (what `DecodeAPI.kv_address` returns and the router hands the prefill worker unread):
``"<commit address>|<address>@<first layer>+<layers>|..."``; without ``|`` it is a plain receiver address.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from kvtransfer.payload import ErrorCode, KVHeader, PayloadError, make_payload
from kvtransfer.transport import KVSender, TransferResult


@dataclass(frozen=True)
class Endpoint:
    """A receiver holding layers [first_layer, first_layer + num_layers) of the decode worker's model."""

    address: str
    first_layer: int
    num_layers: int

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)


@dataclass(frozen=True)
class KVRoute:
    """Where a decode worker takes KV: `commit` (its own receiver: whole payloads, manifests) and, when its layers
    sit in stages, `endpoints` (a receiver per stage). No endpoints: `commit` holds every layer."""

    commit: str
    endpoints: tuple[Endpoint, ...] = ()

    def encode(self) -> str:
        return "|".join([self.commit, *(f"{e.address}@{e.first_layer}+{e.num_layers}" for e in self.endpoints)])

    @classmethod
    def parse(cls, text: str) -> KVRoute:
        """The route `encode` wrote (or a plain address); ValueError naming the bad field otherwise."""
        commit, *rest = text.split("|")
        if not commit:
            raise ValueError(f"kv_target: no receiver address in {text!r}")
        endpoints = []
        for item in rest:
            address, _, layers = item.rpartition("@")
            first, _, count = layers.partition("+")
            if not address or not first.isdigit() or not count.isdigit() or int(count) == 0:
                raise ValueError(f"kv_target: endpoint {item!r} is not ADDRESS@FIRST_LAYER+LAYERS")
            endpoints.append(Endpoint(address, int(first), int(count)))
        want = 0
        for e in endpoints:
            if e.first_layer != want:
                raise ValueError(f"kv_target: endpoints do not tile the layers in order at layer {want}: {text!r}")
            want = e.layers.stop
        return cls(commit, tuple(endpoints))

    def receivers(self, num_layers: int) -> tuple[Endpoint, ...]:
        """Every endpoint, or the commit point holding all `num_layers` layers."""
        if not self.endpoints:
            return (Endpoint(self.commit, 0, num_layers),)
        if self.endpoints[-1].layers.stop != num_layers:
            raise ValueError(
                f"kv_target: endpoints hold {self.endpoints[-1].layers.stop} layers, the model {num_layers}"
            )
        return self.endpoints

    def overlaps(self, layers: range, num_layers: int) -> list[tuple[Endpoint, range]]:
        """The endpoints holding some of `layers`, each with the layers they share (in layer order)."""
        out = []
        for e in self.receivers(num_layers):
            shared = range(max(e.first_layer, layers.start), min(e.layers.stop, layers.stop))
            if len(shared):
                out.append((e, shared))
        return out


@runtime_checkable
class PushesKV(Protocol):
    """A runtime whose KV sits in stage processes that send it themselves (`engine.staged_runtime`)."""

    def push_kv(
        self, seq_id: int, request_id: str, begin: int, end: int, route: KVRoute, timeout_s: float
    ) -> TransferResult: ...


@runtime_checkable
class Landing(Protocol):
    """Where a decode worker's parts wait for their manifest: `hold` a part (a transport thread), `commit` the
    parts of a manifest's tokens into a sequence, all layers or none (the engine's thread), `drop` a request's
    parts (it ended before its commit). `runtime_io.LocalLanding` (one process) or the stages
    (`engine.staged_runtime.StagedRuntime`)."""

    def hold(self, header: KVHeader, k: np.ndarray, v: np.ndarray) -> None: ...

    def commit(self, seq_id: int, header: KVHeader) -> None: ...

    def drop(self, request_id: str) -> None: ...


@dataclass(frozen=True)
class Scatter:
    """One piece of a request's KV to be sent as parts (`push`, every part acked or the first failure); the sender
    then sends the manifest (tokens [begin, end), `meta`) to the route's commit point."""

    begin: int
    end: int
    meta: bytes
    push: Callable[[KVRoute, float], TransferResult]


def combine(results: Sequence[TransferResult]) -> TransferResult:
    """Results of sends made at once, as one: ok if all are, else the first failure's error; bytes and import times
    summed, the longest wall time."""
    bad = next((r for r in results if not r.ok), None)
    return TransferResult(
        ok=bad is None,
        error=bad.error if bad else None,
        message=bad.message if bad else "",
        nbytes=sum(r.nbytes for r in results),
        transfer_s=max((r.transfer_s for r in results), default=0.0),
        import_s=sum(r.import_s for r in results),
    )


def push_parts(
    sender: KVSender,
    pool: futures.Executor,
    k: np.ndarray,
    v: np.ndarray,
    first_layer: int,
    num_layers: int,
    begin: int,
    request_id: str,
    fingerprint: str,
    page_size: int,
    route: KVRoute,
    timeout_s: float,
) -> TransferResult:
    """Send K/V [layers, n, Hkv, d] of layers [first_layer, ...) of tokens [begin, begin + n): to each endpoint the
    layers it holds (a part each, sent at once on `pool`); returns when every part is acked or one failed."""
    held = range(first_layer, first_layer + k.shape[0])
    try:
        shares = route.overlaps(held, num_layers)
    except ValueError as e:
        return TransferResult.failure(ErrorCode.SHAPE_MISMATCH, str(e))
    calls = []
    for e, shared in shares:
        lo, hi = shared.start - first_layer, shared.stop - first_layer
        part = make_payload(
            k[lo:hi], v[lo:hi], fingerprint, begin, request_id, None, page_size, first_layer=shared.start
        )
        calls.append(pool.submit(sender.send, part, e.address, timeout_s))
    return combine([c.result() for c in calls])


@dataclass
class _Held:
    header: KVHeader
    k: np.ndarray  # [part's layers, n, Hkv, d] (or read-only per-layer views of the received chunks)
    v: np.ndarray
    t: float


class KVParts:
    """Parts of KV pieces an endpoint holds until their commit, for its `layers`; thread-safe.

    `add` (a transport thread) keeps a verified part, replacing one of the same layers (a resent part); `take`
    (the commit) returns the piece's K/V of every held layer once parts tile `layers` exactly, or raises
    TRUNCATED naming what is missing. A piece nobody commits is dropped after `ttl_s` (on the next `add`), or by
    `drop(request_id)`; `add` refuses (BUSY) beyond `max_bytes` held. Memory: the parts own their arrays."""

    def __init__(
        self, layers: range, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.layers, self.max_bytes, self.ttl_s, self.clock = layers, max_bytes, ttl_s, clock
        self._pieces: dict[tuple[str, int, int], dict[int, _Held]] = {}  # (request, begin, end) -> first layer -> part
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pieces)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes()

    def _nbytes(self) -> int:
        return sum(p.header.total_bytes for parts in self._pieces.values() for p in parts.values())

    def add(self, header: KVHeader, k: np.ndarray, v: np.ndarray) -> None:
        """Hold a part (its layers within `layers`: the receiver's shape check says so)."""
        now = self.clock()
        with self._lock:
            for key in [
                key for key, parts in self._pieces.items() if now - max(p.t for p in parts.values()) > self.ttl_s
            ]:
                del self._pieces[key]
            if self._nbytes() + header.total_bytes > self.max_bytes:
                raise PayloadError(
                    ErrorCode.BUSY, f"holding {self._nbytes()} bytes of KV parts (limit {self.max_bytes})"
                )
            key = (header.request_id, header.begin, header.end)
            self._pieces.setdefault(key, {})[header.first_layer] = _Held(header, k, v, now)

    def check(self, request_id: str, begin: int, end: int) -> None:
        """Raise TRUNCATED unless the piece's parts tile `layers` (it can be committed)."""
        with self._lock:
            self._tiles(request_id, begin, end)

    def take(self, request_id: str, begin: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V [layers, end - begin, Hkv, d] of the piece, every held layer, in order; the parts are released."""
        with self._lock:
            parts = self._tiles(request_id, begin, end)
            del self._pieces[request_id, begin, end]
        k = np.stack([p.k[i] for p in parts for i in range(p.header.num_layers)])
        v = np.stack([p.v[i] for p in parts for i in range(p.header.num_layers)])
        return k, v

    def _tiles(self, request_id: str, begin: int, end: int) -> list[_Held]:
        parts = self._pieces.get((request_id, begin, end), {})
        at, out = self.layers.start, []
        for first in sorted(parts):
            if first != at:
                break
            out.append(parts[first])
            at = parts[first].header.layers.stop
        if at != self.layers.stop:
            got = sorted((p.header.layers.start, p.header.layers.stop) for p in parts.values())
            raise PayloadError(
                ErrorCode.TRUNCATED,
                f"KV of tokens [{begin}, {end}) of {request_id}: holds layers {got} of "
                f"[{self.layers.start}, {self.layers.stop}), missing from layer {at}",
            )
        return out

    def drop(self, request_id: str) -> int:
        """Forget every part of `request_id`; how many pieces were held."""
        with self._lock:
            keys = [key for key in self._pieces if key[0] == request_id]
            for key in keys:
                del self._pieces[key]
            return len(keys)
