"""Pipeline stages through the API (#28), with the bundled model (SmolLM2-135M, 30 layers): greedy and seeded
outputs of P1 -> D2, P2 -> D1 and P2 -> D3 (so 2 and 3 decode stages, 2 prefill stages, and KV moved between
different stage counts) are the tokens of a one-stage colocated server; the KV really moves (every prompt is
prefilled by the prefill pool); the cluster status shows each worker's stages, their layers and processes; every
page is free at the end, on every stage. Then a decode stage is killed with SIGKILL mid-stream: the request
migrates and completes with the tokens of an unfailed run, the worker comes back with new stages, and nothing
leaks on the stages that survived (their processes end with the worker)."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
from conftest import real_gguf_path
from serving import Server, assert_clean_exit, collect, request, tokens_of, wait_until

# one request at a time everywhere: decode batches of one, so every server runs the same kernels on the same KV
PROMPTS = [[1, 9690, 314, 253, 1761, 30], [504, 3458, 282, 4649, 314, 2], list(range(300, 390))]
SAMPLING = [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}]
COMMON = ["--max-total-seq-len", "2048", "--speculative", "off", "--local-prefill-max-tokens", "0"]


def _outputs(server: Server, max_tokens: int = 24) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        for s in SAMPLING:
            responses = collect(server.stub, request(p, max_tokens=max_tokens, **s))
            out.append(tokens_of(responses))
            assert len(out[-1]) == max_tokens
    return out


@pytest.fixture(scope="module")
def gguf():
    path = real_gguf_path()
    assert path is not None, "the bundled model is fetched by scripts/test.sh (PDSERVE_TEST_GGUF)"
    return path


@pytest.fixture(scope="module")
def one_stage(gguf, cache_dir):
    server = Server(["--model", str(gguf), "--colocated", "1", *COMMON], cache_dir)
    try:
        yield _outputs(server)
    finally:
        assert_clean_exit(server)


@pytest.mark.parametrize(("prefill", "decode"), [(1, 2), (2, 1), (2, 3)], ids=["P1-D2", "P2-D1", "P2-D3"])
def test_stages_give_the_tokens_of_one_stage(gguf, cache_dir, one_stage, prefill, decode):
    flags = ["--prefill-stages", str(prefill), "--decode-stages", str(decode)]
    server = Server(["--model", str(gguf), *flags, *COMMON], cache_dir, ready_timeout_s=600)
    try:
        assert _outputs(server) == one_stage
        r = collect(server.stub, request(PROMPTS[2], max_tokens=2))
        assert r[-1].timings.kv_transfer_bytes > 0  # the decode stages got the prefill pool's KV
        workers = {w.role: w for w in server.workers()}
        for role, count in (("prefill", prefill), ("decode", decode)):
            stages = workers[role].stages
            assert [s.index for s in stages] == list(range(count)) if count > 1 else stages == []
            if count > 1:
                assert sum(s.num_layers for s in stages) == 30 and stages[0].first_layer == 0
                assert all(psutil.pid_exists(s.pid) and s.pid != workers[role].pid for s in stages)
                assert sum(s.kv_cache_bytes for s in stages) == workers[role].kv_cache_bytes
        assert server.pages_all_free()
    finally:
        assert_clean_exit(server)


def test_a_killed_decode_stage_migrates_its_requests(gguf, cache_dir, one_stage):
    server = Server(["--model", str(gguf), "--decode-stages", "2", *COMMON], cache_dir, ready_timeout_s=600)
    try:
        [decode] = [w for w in server.workers() if w.role == "decode"]
        victim, survivor = decode.stages[1].pid, psutil.Process(decode.stages[0].pid)
        stream = server.stub.Generate(request(PROMPTS[0], max_tokens=24), timeout=300)
        got = [next(stream)]  # the first token came: the request is decoding on the stages
        os.kill(victim, signal.SIGKILL)
        got += list(stream)
        assert tokens_of(got) == one_stage[0]  # migrated, nothing lost or repeated
        wait_until(lambda: not survivor.is_running() or survivor.status() == psutil.STATUS_ZOMBIE, 60, "survivor ends")
        server.wait_alive("decode", 1, timeout_s=300, restarts_at_least=1)
        [decode] = [w for w in server.workers() if w.role == "decode"]
        assert len(decode.stages) == 2 and victim not in {s.pid for s in decode.stages}
        assert _outputs(server, max_tokens=8) == [t[:8] for t in one_stage]  # the new stages serve
        assert server.pages_all_free()
    finally:
        assert_clean_exit(server)
