"""Bulk movers for the NCCL KV path (`nccl_transport`): the `BulkLink`/`BulkBackend` roles and their NCCL
implementation through cupy (`CupyNccl`). Import-safe without cupy or a GPU: `CupyNccl()` raises RuntimeError."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any

NCCL_UNAVAILABLE = "NCCL transport needs CUDA + cupy"


class BulkLink(ABC):
    """One end of a 2-rank point-to-point link (sender rank 0, receiver rank 1); used by one thread at a time."""

    @abstractmethod
    def send(self, bufs: list[Any]) -> None:
        """Send each 1-D uint8 device buffer in order; returns when they left (the buffers may then be freed)."""

    @abstractmethod
    def post_recv(self, bufs: list[Any]) -> None:
        """Enqueue receives into each 1-D uint8 device buffer, in order (asynchronous)."""

    @abstractmethod
    def wait_recv(self) -> None:
        """Block until the posted receives completed."""

    @abstractmethod
    def close(self, abort: bool = False) -> None:
        """Release the link; `abort` when an operation may be pending (it is cancelled, not waited for)."""


class BulkBackend(ABC):
    """Device memory plus links: `CupyNccl` on CUDA; tests use a host-memory implementation."""

    xp: Any  # the array module of device buffers (cupy; numpy for host backends)

    @abstractmethod
    def new_unique_id(self) -> bytes:
        """A fresh rendezvous id for `join`."""

    @abstractmethod
    def join(self, unique_id: bytes, rank: int) -> BulkLink:
        """Join the 2-rank link named by `unique_id`; blocks until the other rank joined too."""

    @abstractmethod
    def empty(self, nbytes: int) -> Any:
        """A new 1-D uint8 device buffer."""

    @abstractmethod
    def to_device(self, a: Any) -> Any:
        """`a` (host or device array) as a C-contiguous device array, without copying when it already is one."""


def _load_nccl() -> tuple[Any, Any] | None:
    """(cupy, cupy.cuda.nccl) if both import and a CUDA device is visible, else None."""
    try:
        cupy = importlib.import_module("cupy")
        nccl = importlib.import_module("cupy.cuda.nccl")
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # ImportError, CUDARuntimeError (no driver), ...
        return None
    return cupy, nccl


def nccl_available() -> bool:
    return _load_nccl() is not None


def unique_id_to_bytes(uid: tuple[int, ...]) -> bytes:
    """NCCL unique id (cupy gives 128 signed chars) -> bytes for the gRPC rendezvous message."""
    return bytes(b & 0xFF for b in uid)


def unique_id_from_bytes(data: bytes) -> tuple[int, ...]:
    return tuple(b - 256 if b > 127 else b for b in data)


class _NcclLink(BulkLink):
    def __init__(self, backend: CupyNccl, comm: Any, rank: int) -> None:
        self._b, self._comm, self._peer = backend, comm, 1 - rank
        with backend.cupy.cuda.Device(backend.device_id):
            self._stream = backend.cupy.cuda.Stream(non_blocking=True)

    def _enqueue(self, bufs: list[Any], op: str) -> None:
        nccl = self._b.nccl
        nccl.groupStart()
        try:
            for b in bufs:
                getattr(self._comm, op)(b.data.ptr, b.size, nccl.NCCL_UINT8, self._peer, self._stream.ptr)
        finally:
            nccl.groupEnd()

    def send(self, bufs: list[Any]) -> None:
        with self._b.cupy.cuda.Device(self._b.device_id):
            self._b.cupy.cuda.Device().synchronize()  # the export kernels ran on other streams
            self._enqueue(bufs, "send")
            self._stream.synchronize()

    def post_recv(self, bufs: list[Any]) -> None:
        with self._b.cupy.cuda.Device(self._b.device_id):
            self._enqueue(bufs, "recv")

    def wait_recv(self) -> None:
        self._stream.synchronize()

    def close(self, abort: bool = False) -> None:
        if abort:
            self._comm.abort()
        else:
            self._comm.destroy()


class CupyNccl(BulkBackend):
    """NCCL through cupy on CUDA device `device_id`."""

    def __init__(self, device_id: int = 0) -> None:
        loaded = _load_nccl()
        if loaded is None:
            raise RuntimeError(NCCL_UNAVAILABLE)
        self.cupy, self.nccl = loaded
        self.xp = self.cupy
        self.device_id = device_id

    def new_unique_id(self) -> bytes:
        return unique_id_to_bytes(self.nccl.get_unique_id())

    def join(self, unique_id: bytes, rank: int) -> BulkLink:
        with self.cupy.cuda.Device(self.device_id):
            comm = self.nccl.NcclCommunicator(2, unique_id_from_bytes(unique_id), rank)
        return _NcclLink(self, comm, rank)

    def empty(self, nbytes: int) -> Any:
        with self.cupy.cuda.Device(self.device_id):
            return self.cupy.empty(nbytes, dtype=self.cupy.uint8)

    def to_device(self, a: Any) -> Any:
        with self.cupy.cuda.Device(self.device_id):
            return self.cupy.ascontiguousarray(self.cupy.asarray(a))
