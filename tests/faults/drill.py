"""Fixtures and helpers of the fault-injection suite (a pytest plugin of tests/conftest.py; no conftest.py
here, so `from conftest import ...` keeps meaning tests/conftest.py): real `pdserve serve` processes (Ray on loopback, real gRPC, the tiny
compiled model), faults injected with real signals or `--inject-fault`, and the checks every test ends with."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import numpy as np
import pytest
from conftest import TINY_GQA
from model_files import write_hf_dir
from reference import random_params
from serving import SLOW_DECODE, Server, assert_clean_exit, request, wait_until  # noqa: F401 (re-exported to the drills)

T = TypeVar("T")


@pytest.fixture(scope="package")
def fault_model(tmp_path_factory, compiled_gqa):
    return write_hf_dir(tmp_path_factory.mktemp("fault-model"), TINY_GQA, random_params(TINY_GQA, seed=9))


@pytest.fixture
def serve(fault_model, cache_dir, tmp_path):
    """`serve(*flags, faults=[...])` starts a server; every server is stopped at the end and must exit cleanly."""
    servers: list[Server] = []

    def start(*flags: str, faults: Sequence[str] = ()) -> Server:
        markers = tmp_path / f"markers{len(servers)}"
        markers.mkdir()
        # the drills exercise the disaggregated path: no short prompt is prefilled by the decode worker. They assert
        # that a migrated request's tokens equal an unfailed run's: the new worker recomputes the KV (prompt and
        # tokens so far) in other forwards than the lost worker did; float32 KV keeps those sums' differences
        # (~1e-7) below any greedy margin, float16 KV can round them one step apart and flip a near-tie
        args = ["--model", str(fault_model), "--max-total-seq-len", "1024", "--local-prefill-max-tokens", "0"]
        args += ["--kv-cache-dtype", "float32", *flags]
        for f in faults:
            args += ["--inject-fault", f]
        args += ["--fault-marker-dir", str(markers)]
        s = Server(args, cache_dir)
        s.markers = markers
        servers.append(s)
        return s

    yield start
    for s in (s for s in servers if s.proc.poll() is None):  # a test may have stopped its server itself
        for pid in s.tree_pids():  # a test that failed half-way may have left a worker stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert_clean_exit(s)


def prompts(n: int, seed: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, TINY_GQA.vocab_size, int(rng.integers(4, 40)))] for _ in range(n)]


@dataclass
class Stream:
    """One request streamed on a thread: its tokens as they come, then its outcome."""

    tokens: list[int] = field(default_factory=list)
    code: grpc.StatusCode | None = None  # None while running, OK when finished
    details: str = ""
    migrations: int = 0
    done: threading.Event = field(default_factory=threading.Event)


def start_streams(
    server: Server, ps: Sequence[Sequence[int]], max_tokens: int, timeout_s: float = 150.0, **sampling
) -> list[Stream]:
    streams = [Stream() for _ in ps]

    def run(p: Sequence[int], st: Stream) -> None:
        try:
            for r in server.stub.Generate(request(p, max_tokens=max_tokens, **sampling), timeout=timeout_s):
                st.tokens.extend(r.token_ids)
                if r.finish_reason:
                    st.migrations = r.timings.migrations
            st.code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            st.code, st.details = e.code(), e.details()
        finally:
            st.done.set()

    for p, st in zip(ps, streams, strict=True):
        threading.Thread(target=run, args=(p, st), daemon=True).start()
    return streams


def wait_streams(streams: Sequence[Stream], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    for st in streams:
        assert st.done.wait(max(0.0, deadline - time.monotonic())), "a stream hung"


def run_all(server: Server, ps: Sequence[Sequence[int]], max_tokens: int, **sampling) -> list[Stream]:
    streams = start_streams(server, ps, max_tokens, **sampling)
    wait_streams(streams)
    return streams


def assert_completed(streams: Sequence[Stream], want: Sequence[Sequence[int]] | None = None) -> None:
    """Every request finished with all its tokens (and, given `want`, exactly those)."""
    bad = [(st.code, st.details) for st in streams if st.code is not grpc.StatusCode.OK]
    assert bad == [], bad
    if want is not None:
        assert [st.tokens for st in streams] == [list(w) for w in want]


def assert_no_traceback(streams: Sequence[Stream]) -> None:
    for st in streams:
        assert "Traceback" not in st.details and 'File "' not in st.details, st.details


def assert_recovered(server: Server, timeout_s: float = 60.0) -> None:
    """Every worker alive with all its pages free and no sequences, and a new request is served."""
    assert server.pages_all_free(timeout_s), server.workers()
    later = run_all(server, prompts(2, seed=99), max_tokens=4)
    assert_completed(later)
    assert server.pages_all_free(timeout_s), server.workers()


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)
