"""`EngineLoop`: the thread that owns a model runtime, and `OutputStream`: per-request event queues.

The runtime and its KV cache are not thread-safe, so every touch goes through the loop's thread: other threads
(RPC handlers, the KV receiver) hand it calls with `call(fn)` (blocks for the result) or `post(fn)`. Between
calls the loop runs `step()` (schedule -> execute -> update) while there is work, and sleeps on its inbox
otherwise. Tests may drive it by hand with `tick()` without starting the thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from engine.messages import Output, is_terminal

T = TypeVar("T")


class EngineLoop:
    """Base class: subclasses implement `step() -> bool` (True if it did work).

    Driven by hand (tests): never `start()` it, and call `tick()` from the thread that created the engine. Calls
    from that thread run inline; calls posted from other threads (a transfer thread, a KV receiver) wait in the
    inbox for the next `tick()`, so the runtime is still touched by one thread only."""

    idle_wait_s = 0.05

    def __init__(self, name: str) -> None:
        self.name = name
        self._inbox: queue.SimpleQueue[tuple[Callable[[], object], cf.Future]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owner = threading.get_ident()  # drives the engine until `start()`
        self.error: BaseException | None = None  # set if step() raised: the engine is broken and stops
        self.on_fatal: Callable[[BaseException], None] | None = None  # after on_broken (a host exits its process)

    # ---- cross-thread entry points ------------------------------------------------------------------------
    def post(self, fn: Callable[[], T]) -> cf.Future:
        """Run `fn` on the engine's thread; its future. Inline when already there."""
        fut: cf.Future = cf.Future()
        driver = self._thread.ident if self._thread is not None else self._owner
        if threading.get_ident() == driver:
            _run_into(fn, fut)
        elif self._stop.is_set():
            fut.set_exception(RuntimeError(f"{self.name} engine is stopped"))
        else:
            self._inbox.put((fn, fut))
        return fut

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        return self.post(fn).result(timeout)

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._inbox.put((lambda: None, cf.Future()))  # wake it
            self._thread.join(timeout)
        self._drain(cancel=True)

    def step(self) -> bool:
        raise NotImplementedError

    def tick(self) -> bool:
        """One iteration: run what other threads posted, then `step()`. True if it did work."""
        ran = self._drain()
        return self.step() or ran > 0

    def _drain(self, cancel: bool = False) -> int:
        n = 0
        while True:
            try:
                fn, fut = self._inbox.get_nowait()
            except queue.Empty:
                return n
            if cancel:
                fut.cancel()
            else:
                _run_into(fn, fut)
            n += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain()
            try:
                busy = self.step()
            except BaseException as e:  # a broken engine stops instead of spinning on the same error
                self.error = e
                self._stop.set()
                self.on_broken(e)
                if self.on_fatal is not None:
                    self.on_fatal(e)
                break
            if not busy:
                try:
                    fn, fut = self._inbox.get(timeout=self.idle_wait_s)
                except queue.Empty:
                    continue
                _run_into(fn, fut)

    def on_broken(self, error: BaseException) -> None:
        """Called once on the loop thread when step() raised; subclasses fail their requests here."""


def _run_into(fn: Callable[[], object], fut: cf.Future) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn())
    except BaseException as e:
        fut.set_exception(e)


class OutputStream:
    """Events of one request, in order; ends with a TokenEvent carrying a finish reason or a RequestError."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Output] = queue.SimpleQueue()

    def put(self, item: Output) -> None:
        self._q.put(item)

    def get(self, timeout: float | None = None) -> Output:
        return self._q.get(timeout=timeout)

    def __iter__(self) -> Iterator[Output]:
        while True:
            item = self._q.get()
            yield item
            if is_terminal(item):
                return

    def chunks(self) -> Iterator[tuple[Output, ...]]:
        """The events in order, each chunk all that had arrived when it was taken (waiting only for its first):
        the tokens of one speculative step travel together, as one message to the router."""
        while True:
            chunk = [self._q.get()]
            while not is_terminal(chunk[-1]):
                try:
                    chunk.append(self._q.get_nowait())
                except queue.Empty:
                    break
            yield tuple(chunk)
            if is_terminal(chunk[-1]):
                return
