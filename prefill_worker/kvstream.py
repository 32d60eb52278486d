"""`KVStream`: one request's KV, sent to its decode worker in order, piece by piece, off the engine thread.

Call order:
  1. the prefill engine makes one `KVStream` per request whose KV it ships;
  2. `push(piece)` on the engine thread: after each prefill chunk that leaves new prompt tokens (a partial piece),
     and once after the last chunk (the final piece, with the first token in its meta);
  3. a transfer thread builds each piece's payload (gathers its KV from the pages and checksums it) and sends it,
     pieces strictly in order, one at a time; a send that fails with a retryable error is sent once more;
  4. `on_end(StreamEnd)` runs once, on that thread, when the final piece is acked or a piece failed for good;
  5. `abort()` (cancel, shutdown) drops the queued pieces; the engine cancels the send in flight through its
     sender. An aborted stream that was idle never calls `on_end`.
Memory: a piece reads the request's KV pages when its payload is built, on the transfer thread. The engine must
keep the sequence until the stream is idle: `when_idle(fn)` says whether it is, or runs `fn` once it becomes so.
Each payload is dropped as soon as its send returns.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtransfer.payload import ErrorCode, KVPayload
from kvtransfer.route import Scatter
from kvtransfer.transport import TransferResult

# transport failures worth one more try (a rejection by the receiver, a lease that ran out or a cancel are not)
RETRYABLE = frozenset(
    {ErrorCode.UNAVAILABLE, ErrorCode.CHECKSUM_MISMATCH, ErrorCode.TRUNCATED, ErrorCode.CANCELLED, ErrorCode.BUSY}
)


@dataclass(frozen=True)
class Piece:
    """Some prompt tokens of one request (the range is in the payload's header); `build` makes the payload (or the
    parts to scatter, `kvtransfer.route`) on the transfer thread."""

    build: Callable[[], KVPayload | Scatter]
    final: bool  # the last piece: its meta carries the first token, and its ack ends the stream


@dataclass
class StreamStats:
    """Sums over the pieces sent so far (written by the transfer thread only)."""

    pieces: int = 0
    nbytes: int = 0
    export_s: float = 0.0  # building payloads: gather + checksum
    transfer_s: float = 0.0  # send to ack, the receiver's import included
    import_s: float = 0.0  # the receiver's imports
    retries: int = 0


@dataclass(frozen=True)
class StreamEnd:
    """How a stream ended: `result` of the last send (ok: the final piece is in), or `export_error`."""

    result: TransferResult | None
    export_error: str | None
    stats: StreamStats
    acked_at: float  # perf_counter when it ended

    @property
    def ok(self) -> bool:
        return self.result is not None and self.result.ok


SendFn = Callable[[KVPayload | Scatter, bool], TransferResult]  # (payload, is_retry) -> result; never raises


@dataclass(eq=False)
class KVStream:
    send: SendFn
    executor: cf.Executor
    on_end: Callable[[StreamEnd], None]
    stats: StreamStats = field(default_factory=StreamStats)
    _queue: collections.deque[Piece] = field(default_factory=collections.deque)
    _busy: bool = False
    _ended: bool = False
    _aborted: bool = False
    _idle_cb: Callable[[], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def started(self) -> bool:
        """Whether any piece was pushed (the decode worker may hold some of this request's KV)."""
        return self.stats.pieces > 0 or self._busy or bool(self._queue)

    def push(self, piece: Piece) -> bool:
        """Queue `piece` behind the others; False (and nothing queued) when the stream already ended."""
        with self._lock:
            if self._ended or self._aborted:
                return False
            self._queue.append(piece)
            if self._busy:
                return True
            self._busy = True
        try:
            self.executor.submit(self._drain)
        except RuntimeError:  # the executor is shut down: the engine is closing
            with self._lock:
                self._busy = False
                self._queue.clear()
            return False
        return True

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            self._queue.clear()

    def when_idle(self, fn: Callable[[], None]) -> bool:
        """True when no transfer thread works on this stream (nor will, unless pushed again); otherwise `fn` runs
        on the transfer thread as it leaves, and this returns False."""
        with self._lock:
            if not self._busy:
                return True
            self._idle_cb = fn
            return False

    def _drain(self) -> None:  # transfer thread
        while True:
            with self._lock:
                if self._ended or self._aborted or not self._queue:
                    self._busy = False
                    idle, self._idle_cb = self._idle_cb, None
                    break
                piece = self._queue.popleft()
            end = self._send_piece(piece)
            if end is not None:
                with self._lock:
                    self._ended = True
                    self._queue.clear()
                self.on_end(end)
        if idle is not None:
            idle()

    def _send_piece(self, piece: Piece) -> StreamEnd | None:
        """Build and send one piece (retried once); the stream's end if this piece ended it, else None."""
        s = self.stats
        t0 = time.perf_counter()
        try:
            payload = piece.build()
        except Exception as e:  # this request fails alone
            return StreamEnd(None, f"KV export failed: {type(e).__name__}: {e}", s, time.perf_counter())
        s.export_s += time.perf_counter() - t0
        result = self.send(payload, False)
        if not result.ok and result.error in RETRYABLE and not self._aborted:
            s.transfer_s += result.transfer_s
            result = self.send(payload, True)
            s.retries += 1
        del payload
        s.pieces += 1
        s.nbytes += result.nbytes
        s.transfer_s += result.transfer_s
        s.import_s += result.import_s
        if not result.ok or piece.final:
            return StreamEnd(result, None, s, time.perf_counter())
        return None
