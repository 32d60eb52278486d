"""A real `pdserve serve` subprocess for end-to-end and fault tests, and helpers to drive and inspect it.

The server's output is read on a thread for its whole life (a full pipe would block it) and kept in `lines`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc
import psutil
from ray_cluster import LOOPBACK_ENV

from protos import generate_pb2 as pb
from protos import generate_pb2_grpc as pb_grpc

T = TypeVar("T")

# `--inject-fault` for a server whose decode steps each pause >= 20 ms, like a real model: faults land mid-stream,
# and a long request is known to outlast a short deadline on any machine
SLOW_DECODE = "decode_step:pause:0.02x100000000"


class _Auth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer KEY` to every call (a server started with --api-key)."""

    def __init__(self, key: str) -> None:
        self.metadata = (("authorization", f"Bearer {key}"),)

    def _with_key(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)


class Server:
    def __init__(
        self, args: Sequence[str], cache_dir, ready_timeout_s: float = 240.0, api_key: str | None = None
    ) -> None:
        env = {**os.environ, **LOOPBACK_ENV, "PDSERVE_CACHE_DIR": str(cache_dir)}
        self.proc = subprocess.Popen(
            # no HTTP API unless a test asks for one (servers run side by side; 8000 would be taken)
            [sys.executable, "-m", "pdserve", "serve", "--port", "0", "--http-port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        ready = threading.Event()
        self.address = ""

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if m := re.search(r"serving .* on (\S+:\d+)", line):
                    self.address = m.group(1)
                if line.strip() == "pdserve: ready":
                    ready.set()
            ready.set()  # exited

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(ready_timeout_s) or self.proc.poll() is not None or not self.address:
            self.proc.kill()
            raise RuntimeError("pdserve serve did not become ready:\n" + "".join(self.lines))
        self.channel = grpc.insecure_channel(self.address)
        channel = self.channel if api_key is None else grpc.intercept_channel(self.channel, _Auth(api_key))
        self.stub = pb_grpc.GenerationStub(channel)

    def output(self) -> str:
        return "".join(self.lines)

    def tree_pids(self) -> set[int]:
        p = psutil.Process(self.proc.pid)
        return {p.pid} | {c.pid for c in p.children(recursive=True)}

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 60.0) -> set[int]:
        pids = self.tree_pids()
        self.channel.close()
        self.proc.send_signal(sig)
        self.proc.wait(timeout_s)
        return pids

    def workers(self) -> list[pb.WorkerStatus]:
        return list(self.stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10).workers)

    def pids(self, role: str) -> list[int]:
        return [w.pid for w in self.workers() if w.role == role]

    def pages_all_free(self, timeout_s: float = 15.0) -> bool:
        """Every worker alive, each of its pages free or held by its prefix cache, and no request's sequence in
        its KV cache (within `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ws = self.workers()
            if ws and all(w.alive and w.free_pages + w.cached_pages == w.total_pages and w.sequences == 0 for w in ws):
                return True
            time.sleep(0.25)
        return False

    def wait_alive(self, role: str, count: int, timeout_s: float = 120.0, restarts_at_least: int = 0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ws = [w for w in self.workers() if w.role == role]
            if sum(w.alive for w in ws) >= count and sum(w.restarts for w in ws) >= restarts_at_least:
                return
            time.sleep(0.25)
        raise AssertionError(f"{role} workers not back: {self.workers()}\n{self.output()[-3000:]}")


def assert_clean_exit(s: Server, sig: int = signal.SIGINT, pids: set[int] | None = None) -> None:
    """The server exits 0 on the signal (already sent when `pids`, its process tree then, is given) and leaves no
    process of its tree behind."""
    if pids is None:
        pids = s.stop(sig)
    else:
        s.channel.close()
        s.proc.wait(60)
    assert s.proc.returncode == 0, (s.proc.returncode, s.output()[-3000:])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(pids):
        time.sleep(0.2)
    assert _alive(pids) == [], f"processes left behind: {_alive(pids)}"


def _alive(pids: set[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def request(ids, max_tokens=8, request_id: str = "", **sampling) -> pb.GenerateRequest:
    s = pb.SamplingParams(
        max_tokens=max_tokens, temperature=sampling.pop("temperature", 0.0), ignore_eos=True, **sampling
    )
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(ids)), sampling=s, request_id=request_id)


def collect(stub, req, timeout: float = 120, **kw) -> list[pb.GenerateResponse]:
    """Every response of one Generate call (`kw`: the call's other options, e.g. `metadata`)."""
    return list(stub.Generate(req, timeout=timeout, **kw))


def tokens_of(responses: Sequence[pb.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def wait_for(path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


def wait_until(cond: Callable[[], T], timeout_s: float = 60.0, what: str = "condition") -> T:
    """Poll `cond` until it returns something truthy, and return that: a test waits for the state it expects
    (another thread's or process's progress) instead of sleeping for a guessed time. The timeout only guards a
    hang."""
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


def scrape_metric(port: int, name: str, label: str = "") -> float:
    """The sum of the samples of Prometheus metric `name` (those whose line contains `label`) at 127.0.0.1:port."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(ln.split()[-1]) for ln in body.splitlines() if ln.startswith(name) and label in ln)
