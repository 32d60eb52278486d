"""GPU-to-GPU KV transfer over NCCL (cupy.cuda.nccl): a skeleton behind the `KVSender`/`KVReceiver` interface.

Planned protocol (the bulk path is not wired yet; `send`/`start` raise NotImplementedError):
1. Rendezvous over gRPC: the sender opens the usual `Push` stream and sends the header message plus an NCCL
   unique id (a new `KVChunk` field), then waits for the receiver to join a 2-rank communicator
   (sender rank 0, receiver rank 1; communicators are cached per (target, device) pair).
2. Bulk: the sender exports K and V into one device buffer [k_bytes + v_bytes] (uint8) and `ncclSend`s it; the
   receiver `ncclRecv`s into a preallocated device buffer on its stream, then calls the sink with device
   arrays (cupy views [layers, end-begin, kv_heads, head_dim]); NCCL's transport replaces the chunk CRCs.
3. Commit and ack over the gRPC stream exactly as in `grpc_transport` (commit, import, ack after the sink).
Import-safe without cupy or a GPU; constructing a sender/receiver there raises `RuntimeError`.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

from kvtransfer.payload import KVHeader, KVPayload
from kvtransfer.transport import CancelResult, ImportSink, KVReceiver, KVSender, TransferResult

NCCL_UNAVAILABLE = "NCCL transport needs CUDA + cupy"


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


def _is_cuda(device: str) -> bool:
    return device.strip().lower().split(":", 1)[0] in {"cuda", "gpu"}


def select_transport(src_device: str, dst_device: str) -> Literal["nccl", "grpc"]:
    """ "nccl" when both ends keep their KV cache on CUDA devices ("cuda", "cuda:1", "gpu"), else "grpc"."""
    return "nccl" if _is_cuda(src_device) and _is_cuda(dst_device) else "grpc"


def unique_id_to_bytes(uid: tuple[int, ...]) -> bytes:
    """NCCL unique id (cupy gives 128 signed chars) -> bytes for the gRPC rendezvous message."""
    return bytes(b & 0xFF for b in uid)


def unique_id_from_bytes(data: bytes) -> tuple[int, ...]:
    return tuple(b - 256 if b > 127 else b for b in data)


def stage_on_device(cupy: Any, payload: KVPayload) -> Any:
    """Copy K then V into one new device buffer [k_bytes + v_bytes] (uint8) on the current device and stream."""
    h = payload.header
    buf = cupy.empty(h.total_bytes, dtype=cupy.uint8)
    buf[: h.k_bytes].set(payload.k.reshape(-1).view("uint8"))
    buf[h.k_bytes :].set(payload.v.reshape(-1).view("uint8"))
    return buf


def device_views(cupy: Any, buf: Any, header: KVHeader) -> tuple[Any, Any]:
    """(k, v) device views [layers, end-begin, kv_heads, head_dim] of a received buffer laid out as above."""
    dt = cupy.dtype(header.dtype)
    return buf[: header.k_bytes].view(dt).reshape(header.shape), buf[header.k_bytes :].view(dt).reshape(header.shape)


def nccl_send(nccl: Any, comm: Any, buf: Any, peer: int, stream_ptr: int) -> None:
    """Enqueue ncclSend of a contiguous uint8 device buffer to `peer` on `stream_ptr` (async; sync the stream)."""
    comm.send(buf.data.ptr, buf.size, nccl.NCCL_UINT8, peer, stream_ptr)


def nccl_recv(nccl: Any, comm: Any, buf: Any, peer: int, stream_ptr: int) -> None:
    """Enqueue ncclRecv from `peer` into a preallocated uint8 device buffer (async; sync before reading)."""
    comm.recv(buf.data.ptr, buf.size, nccl.NCCL_UINT8, peer, stream_ptr)


class NcclKVSender(KVSender):
    """Sender side of the NCCL path; owns its communicators and device staging buffers (one per target)."""

    def __init__(self, device_id: int = 0) -> None:
        loaded = _load_nccl()
        if loaded is None:
            raise RuntimeError(NCCL_UNAVAILABLE)
        self._cupy, self._nccl = loaded
        self.device_id = device_id
        self._comms: dict[str, Any] = {}  # target -> NcclCommunicator (rank 0)

    def send(self, payload: KVPayload, target: str, timeout_s: float) -> TransferResult:
        raise NotImplementedError("NCCL bulk path not wired yet; use select_transport(...) == 'grpc' paths")

    def cancel(self, request_id: str) -> CancelResult:
        return CancelResult.NOT_FOUND

    def close(self) -> None:
        for comm in self._comms.values():
            comm.destroy()
        self._comms.clear()


class NcclKVReceiver(KVReceiver):
    """Receiver side of the NCCL path: a gRPC control server plus NCCL receives into device buffers."""

    def __init__(self, sink: ImportSink, host: str = "127.0.0.1", port: int = 0, device_id: int = 0) -> None:
        loaded = _load_nccl()
        if loaded is None:
            raise RuntimeError(NCCL_UNAVAILABLE)
        self._cupy, self._nccl = loaded
        self._sink, self._host, self._port, self.device_id = sink, host, port, device_id

    def start(self) -> str:
        raise NotImplementedError("NCCL bulk path not wired yet; use select_transport(...) == 'grpc' paths")

    def stop(self, grace_s: float | None = None) -> None:
        return None
