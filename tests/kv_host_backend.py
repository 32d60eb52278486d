"""A host-memory `BulkBackend` for CPU tests of the NCCL path's control plane (gRPC rendezvous, ready, commit,
abort, checksums, sink): links are in-process queues, "device" buffers are numpy arrays. A fast extra layer:
the real NCCL backend (`CupyNccl`) is exercised by tests/gpu on a CUDA machine."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

import numpy as np

from kvtransfer.nccl_backend import BulkBackend, BulkLink


class HostLink(BulkLink):
    def __init__(self, backend: HostBackend, q: queue.Queue, rank: int) -> None:
        self.backend, self.q, self.rank = backend, q, rank
        self.pending: list[np.ndarray] = []
        self.closed: str | None = None

    def send(self, bufs: list) -> None:
        for b in bufs:
            data = np.array(b, copy=True)
            if self.backend.corrupt_next:
                self.backend.corrupt_next = False
                data[len(data) // 2] ^= 0xFF
            self.q.put(data)
        self.backend.sends += 1

    def post_recv(self, bufs: list) -> None:
        self.pending = list(bufs)
        if self.backend.on_post_recv is not None:
            self.backend.on_post_recv()

    def wait_recv(self) -> None:
        for b in self.pending:
            b[...] = self.q.get(timeout=30)
        self.pending = []

    def close(self, abort: bool = False) -> None:
        self.closed = "abort" if abort else "destroy"


class HostBackend(BulkBackend):
    """Both ranks must use the same instance (one process)."""

    xp = np

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rendezvous: dict[bytes, tuple[threading.Barrier, queue.Queue]] = {}
        self.links: list[HostLink] = []
        self.sends = 0
        self.corrupt_next = False
        self.on_post_recv: Callable[[], None] | None = None

    def new_unique_id(self) -> bytes:
        return os.urandom(128)

    def join(self, unique_id: bytes, rank: int) -> BulkLink:
        with self._lock:
            barrier, q = self._rendezvous.setdefault(unique_id, (threading.Barrier(2), queue.Queue()))
        barrier.wait(timeout=30)
        link = HostLink(self, q, rank)
        with self._lock:
            self.links.append(link)
        return link

    def empty(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, dtype=np.uint8)

    def to_device(self, a) -> np.ndarray:
        return np.ascontiguousarray(a)
