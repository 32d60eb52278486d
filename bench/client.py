"""The benchmark's gRPC client (one thread per in-flight request, one channel per run) and `LaunchedServer`,
which runs `pdserve serve --port 0 <flags>` as a subprocess for the duration of a benchmark."""

from __future__ import annotations

import contextlib
import math
import queue
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
from tqdm import tqdm

from bench.stats import SERVER_FIELDS, RequestRecord, ServerTimings
from bench.workload import BenchRequest
from kvtransfer.net import free_port, message_limits
from llama_relax.errors import UserError
from protos import generate_pb2 as pb
from protos import generate_pb2_grpc as pb_grpc

MAX_THREADS = 1024  # in-flight requests when --max-concurrency is not given
CHANNEL_OPTIONS = message_limits()


@dataclass(frozen=True)
class ClientOptions:
    backend: str = "grpc"  # or openai-completions / openai-chat (bench.openai_client)
    api_key: str | None = None
    request_timeout_s: float = 600.0
    max_concurrency: int | None = None
    temperature: float = 0.0
    ignore_eos: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not (self.request_timeout_s > 0 and math.isfinite(self.request_timeout_s)):
            raise ValueError(f"--request-timeout must be a positive number of seconds, got {self.request_timeout_s}")
        if self.max_concurrency is not None and not 1 <= self.max_concurrency <= MAX_THREADS:
            raise ValueError(f"--max-concurrency must be in [1, {MAX_THREADS}], got {self.max_concurrency}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class ServerInfo:
    model: str
    mode: str
    vocab_size: int
    context_window_size: int
    has_tokenizer: bool


@dataclass(frozen=True)
class RunResult:
    records: tuple[RequestRecord, ...]
    duration_s: float
    start: float = 0.0  # perf_counter time of the first send


def to_message(req: BenchRequest, options: ClientOptions) -> pb.GenerateRequest:
    s = pb.SamplingParams(max_tokens=req.output_len, temperature=options.temperature, ignore_eos=options.ignore_eos)
    if req.text is not None:
        return pb.GenerateRequest(text=req.text, sampling=s, chat=req.chat)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=req.token_ids), sampling=s)


class BenchClient:
    """A channel to one server; `run()` replays requests at given send offsets and records their timelines."""

    def __init__(self, addr: str, options: ClientOptions) -> None:
        self.addr = addr
        self.options = options
        self._channel = grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._init_tracking()

    def _init_tracking(self) -> None:
        self._calls: set = set()  # in-flight calls (gRPC calls, HTTP connections): aborted on an interrupted run
        self._lock = threading.Lock()
        self._stopping = False  # set on an interrupted run: calls that register afterwards abort themselves

    def _track(self, call) -> None:
        with self._lock:
            self._calls.add(call)
            stopping = self._stopping
        if stopping:
            self._abort(call)

    def _untrack(self, call) -> None:
        with self._lock:
            self._calls.discard(call)

    def _abort(self, call: grpc.Call) -> None:
        call.cancel()

    def __enter__(self) -> BenchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._cancel_all()
        self._channel.close()

    def info(self, timeout_s: float = 10.0) -> ServerInfo:
        try:
            m = self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            raise UserError(f"GetModelInfo from {self.addr} failed: {e.code().name}: {e.details()}") from None
        return ServerInfo(m.model, m.mode, m.vocab_size, m.context_window_size, m.has_tokenizer)

    def pool_sizes(self) -> dict[str, int]:
        """Live workers per role now (`bench.pools.PoolSampler`)."""
        status = self._stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=5)
        out: dict[str, int] = {}
        for w in status.workers:
            out[w.role] = out.get(w.role, 0) + int(w.alive)
        return out

    def worker_pid(self, role: str) -> int | None:
        """The pid of the server's first live worker of `role` (for `--fault`)."""
        status = self._stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
        return next((w.pid for w in status.workers if w.role == role and w.alive and w.pid), None)

    def run(
        self,
        requests: Sequence[BenchRequest],
        offsets: Sequence[float],
        desc: str = "",
        progress: bool | None = None,
        on_start: Callable[[float], None] | None = None,
    ) -> RunResult:
        """Send request i at `offsets[i]` seconds after the start (later if --max-concurrency slots are all busy);
        every request ends by its deadline, so this returns within ~max(offsets) + n/concurrency * timeout."""
        if len(requests) != len(offsets):
            raise ValueError(f"{len(requests)} requests but {len(offsets)} send offsets")
        msgs = [self._prepare(r) for r in requests]
        limit = min(self.options.max_concurrency or MAX_THREADS, max(len(msgs), 1))
        slots = threading.BoundedSemaphore(limit)
        bar = tqdm(
            total=len(msgs),
            desc=desc or None,
            unit="req",
            file=sys.stderr,
            disable=not (self.options.progress if progress is None else progress),
            dynamic_ncols=True,
        )
        pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="bench-req")
        try:
            start = time.perf_counter()
            if on_start is not None:
                on_start(start)
            futures = []
            for msg, req, off in zip(msgs, requests, offsets, strict=True):
                delay = start + float(off) - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                slots.acquire()
                futures.append(pool.submit(self._one, msg, req.output_len, slots, bar))
            records = tuple(f.result() for f in futures)
        except BaseException:
            self._cancel_all()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        end = max((r.done for r in records), default=start)
        return RunResult(records, max(end - start, 1e-9), start)

    def one(self, req: BenchRequest, bar: tqdm | None = None) -> RequestRecord:
        """Send one request now and wait for its end (a multi-turn conversation's next turn needs the answer)."""
        slot = threading.BoundedSemaphore(1)
        slot.acquire()
        return self._one(self._prepare(req), req.output_len, slot, bar)

    def _prepare(self, req: BenchRequest) -> pb.GenerateRequest:
        """The wire form of a request (built before the run starts, so building it is not timed)."""
        return to_message(req, self.options)

    def _one(
        self, msg: pb.GenerateRequest, target: int, slots: threading.BoundedSemaphore, bar: tqdm | None
    ) -> RequestRecord:
        chunks: list[float] = []
        ids: list[int] = []
        ntok = prompt_tokens = 0
        prompt_ids: tuple[int, ...] = ()
        final: pb.GenerateResponse | None = None
        sent = time.perf_counter()
        try:
            call = self._stub.Generate(msg, timeout=self.options.request_timeout_s)
            self._track(call)
            try:
                for resp in call:
                    now = time.perf_counter()
                    if resp.prompt_token_ids:
                        prompt_ids = tuple(resp.prompt_token_ids)
                    if resp.token_ids:
                        chunks.append(now)
                        ntok += len(resp.token_ids)
                        ids.extend(resp.token_ids)
                    if resp.finish_reason:
                        final = resp
            finally:
                self._untrack(call)
            done = time.perf_counter()
            if final is None:
                return RequestRecord(sent, done, tuple(chunks), ntok, 0, target, "NO_FINAL", "stream ended early")
            prompt_tokens = final.usage.prompt_tokens or len(msg.token_ids.ids)
            timings = ServerTimings(**{k: getattr(final.timings, k) for k in SERVER_FIELDS})
            return RequestRecord(
                sent,
                done,
                tuple(chunks),
                ntok,
                prompt_tokens,
                target,
                server=timings,
                migrations=final.timings.migrations,
                cached_tokens=final.usage.cached_prompt_tokens,
                kv_bytes=final.timings.kv_transfer_bytes,
                spec_drafted=final.timings.spec_draft_tokens,
                spec_accepted=final.timings.spec_accepted_tokens,
                output_ids=tuple(ids),
                prompt_ids=prompt_ids,
            )
        except grpc.RpcError as e:
            code = e.code().name if e.code() is not None else "UNKNOWN"
            return RequestRecord(sent, time.perf_counter(), tuple(chunks), ntok, 0, target, code, e.details() or "")
        except Exception as e:  # a client-side bug must not hang the run; it is counted like a failure
            return RequestRecord(sent, time.perf_counter(), tuple(chunks), ntok, 0, target, type(e).__name__, str(e))
        finally:
            slots.release()
            if bar is not None:
                bar.update(1)

    def _cancel_all(self) -> None:
        with self._lock:
            self._stopping = True
            calls = list(self._calls)
        for c in calls:
            self._abort(c)


class LaunchedServer:
    """`pdserve serve --port 0 <flags>` in a subprocess: started, waited for (`pdserve: ready`), stopped with
    SIGINT. Its stderr goes to `log_path` (a temporary file when None)."""

    def __init__(
        self, flags: str, log_path: Path | None = None, ready_timeout_s: float = 600.0, http: bool = False
    ) -> None:
        try:
            self.flags = shlex.split(flags)
        except ValueError as e:
            raise ValueError(f"serve flags {flags!r}: {e}") from None
        if any(f in ("-h", "--help") for f in self.flags):
            raise ValueError("serve flags: --help is not a server flag")
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.addr = ""
        self.http = http  # serve the OpenAI HTTP API too (on a free port), for the openai-* backends
        self.http_url = ""
        self.exit_code: int | None = None
        self.proc: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pump_thread: threading.Thread | None = None

    def __enter__(self) -> LaunchedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> str:
        http = [] if "--http-port" in self.flags else ["--http-port", str(free_port() if self.http else 0)]
        cmd = [sys.executable, "-m", "pdserve", "serve", "--port", "0", *http, *self.flags]
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "w+", encoding="utf-8")  # noqa: SIM115 (closed in stop())
        else:
            self._log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, text=True, bufsize=1
        )
        self._pump_thread = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
        self._pump_thread.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.addr

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                raise UserError(f"pdserve serve {shlex.join(self.flags)} exited early: {self._last_error()}")
            if m := re.search(r"serving .* on (\S+:\d+)", line):
                self.addr = m.group(1)
            if m := re.search(r"HTTP API on (http://\S+)/v1", line):
                self.http_url = m.group(1)
            if line.strip() == "pdserve: ready":
                if not self.addr or (self.http and not self.http_url):
                    raise RuntimeError("pdserve serve said ready without printing its address")
                return
        raise UserError(f"pdserve serve {shlex.join(self.flags)} not ready after {self.ready_timeout_s:.0f} s")

    def _last_error(self) -> str:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self._log is None:
            return "no log"
        self._log.flush()
        self._log.seek(0)
        lines = [ln.strip() for ln in self._log.read().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("pdserve: error")]
        return (errors or lines or ["no output"])[-1]

    def stop(self, timeout_s: float = 90.0) -> int | None:
        """SIGINT, wait for the exit (SIGKILL after `timeout_s`); returns the exit code."""
        proc = self.proc
        if proc is None:
            return self.exit_code
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    print(
                        f"pdserve bench: server pid {proc.pid} ignored SIGINT for {timeout_s:.0f} s; killing it",
                        file=sys.stderr,
                    )
                    proc.kill()
                    proc.wait(30)
            self.exit_code = proc.returncode
        finally:
            if self._pump_thread is not None:
                self._pump_thread.join(5.0)  # EOF once the server (and anything holding its stdout) is gone
            if proc.stdout is not None and not (self._pump_thread and self._pump_thread.is_alive()):
                proc.stdout.close()
            if self._log is not None:
                self._log.close()
            self.proc = None
        return self.exit_code
