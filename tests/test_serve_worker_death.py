"""A decode worker process killed mid-stream: its in-flight request ends with UNAVAILABLE (never a hang) and the
pool keeps serving with the remaining worker."""

from __future__ import annotations

import concurrent.futures as cf
import time

import grpc
import psutil
import pytest
from conftest import TINY_GQA
from model_files import write_hf_dir
from reference import random_params
from test_serve_e2e import Server, assert_clean_exit, collect, request

from protos import generate_pb2 as pb


@pytest.fixture(scope="module")
def server(tmp_path_factory, compiled_gqa, cache_dir):
    model = write_hf_dir(tmp_path_factory.mktemp("death-model"), TINY_GQA, random_params(TINY_GQA, seed=9))
    s = Server(["--model", str(model), "--decode-workers", "2", "--max-total-seq-len", "1024"], cache_dir)
    yield s
    assert_clean_exit(s)


def decode_worker_pids(s: Server) -> list[int]:
    procs = psutil.Process(s.proc.pid).children(recursive=True)
    return [p.pid for p in procs if "DecodeWorker" in " ".join(p.cmdline()) or "DecodeWorker" in p.name()]


def test_killed_decode_worker_fails_its_request_and_the_pool_keeps_serving(server):
    pids = decode_worker_pids(server)
    assert len(pids) == 2, pids
    calls = [server.stub.Generate(request([1, 2, 3, 4 + i], max_tokens=240), timeout=120) for i in range(2)]
    for c in calls:  # both streaming; least-loaded placement puts them on different decode workers
        next(c)
    psutil.Process(pids[0]).kill()
    outcomes = []
    with cf.ThreadPoolExecutor(2) as ex:
        for fut in [ex.submit(lambda c=c: list(c)) for c in calls]:
            try:
                fut.result(60)
                outcomes.append("ok")
            except grpc.RpcError as e:
                outcomes.append(e.code())
    assert grpc.StatusCode.UNAVAILABLE in outcomes, outcomes
    assert "ok" in outcomes, outcomes
    # new requests still complete (on the surviving worker, or the restarted one)
    t0 = time.monotonic()
    for i in range(4):
        responses = collect(server.stub, request([9, 8, 7, i], max_tokens=5))
        assert responses[-1].finish_reason == "length"
    assert time.monotonic() - t0 < 60
    status = server.stub.GetClusterStatus(pb.GetClusterStatusRequest())
    assert sum(w.alive for w in status.workers if w.role == "decode") >= 1
