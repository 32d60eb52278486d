"""End to end through `pdserve serve` (a real local Ray cluster on loopback, real gRPC) with the tiny model:
1 prefill + 1 decode worker against 1 colocated engine; streaming, status codes, cancel/deadline cleanup, health,
reflection, loopback-only listeners, clean shutdown."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest
from conftest import TINY_GQA
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from model_files import write_hf_dir
from ray_cluster import listeners_beyond_loopback
from reference import random_params
from serving import SLOW_DECODE, Server, assert_clean_exit, collect, request, scrape_metric, tokens_of

from kvtransfer.net import free_port
from llama_relax.kv_dtype import kv_bytes_per_token
from protos import generate_pb2 as pb

LENGTHS = [5, 40, 17, 3, 9, 33, 12, 21]
# These servers keep float32 KV: the tests compare greedy tokens across different computations of the same KV (8
# concurrent requests vs one at a time: other batch shapes, so other kernels' sum orders; a migration's recompute),
# which float32 keeps far below any greedy margin and float16 can round one step apart. Float16 (the default) serves
# the other e2e tests (prefix cache, KV streaming, the OpenAI API, traces) and q8_0 test_serve_kv_q8.
KV = ("--kv-cache-dtype", "float32")
KV_BYTES_PER_TOKEN = kv_bytes_per_token(TINY_GQA, "float32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, compiled_gqa):
    return write_hf_dir(tmp_path_factory.mktemp("serve-model"), TINY_GQA, random_params(TINY_GQA, seed=8))


def start_disaggregated(model_dir, cache_dir, *flags: str) -> Server:
    """1 prefill + 1 decode worker with metrics; every prompt goes through the prefill worker and a KV transfer
    (none is prefilled by the decode worker)."""
    metrics_port = free_port()
    args = ["--model", str(model_dir), "--max-total-seq-len", "1024", "--metrics-port", str(metrics_port)]
    s = Server([*args, "--local-prefill-max-tokens", "0", *KV, *flags], cache_dir)
    s.metrics_port = metrics_port
    return s


@pytest.fixture(scope="module")
def disagg(model_dir, cache_dir):
    s = start_disaggregated(model_dir, cache_dir, "--inject-fault", SLOW_DECODE)
    yield s
    assert_clean_exit(s)


@pytest.fixture(scope="module")
def speculative(model_dir, cache_dir):
    """Disaggregated with `--speculative suffix`: the decode worker drafts by prompt lookup (and its recent outputs)
    and verifies; each decode step pauses >= 20 ms, so a request is still decoding when a test kills the worker."""
    s = start_disaggregated(
        model_dir, cache_dir, "--speculative", "suffix", "--num-speculative-tokens", "6", "--inject-fault", SLOW_DECODE
    )
    yield s
    assert_clean_exit(s)


@pytest.fixture(scope="module")
def colocated(model_dir, cache_dir):
    s = Server(
        ["--model", str(model_dir), "--colocated", "1", "--max-total-seq-len", "160", "--speculative", "off", *KV],
        cache_dir,
    )
    yield s
    assert_clean_exit(s)


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(21)
    return [[int(t) for t in rng.integers(0, TINY_GQA.vocab_size, n)] for n in LENGTHS]


def test_disaggregated_streams_the_same_greedy_tokens_as_colocated(disagg, colocated):
    with cf.ThreadPoolExecutor(8) as ex:  # 8 concurrent streaming requests
        got = list(ex.map(lambda p: collect(disagg.stub, request(p)), prompts()))
    want = [collect(colocated.stub, request(p)) for p in prompts()]
    tokens = lambda rs: [t for r in rs for t in r.token_ids]  # noqa: E731
    assert [tokens(r) for r in got] == [tokens(r) for r in want]
    for responses, p in zip(got, prompts(), strict=True):
        assert len(responses) == 8  # streamed one token per message
        assert list(responses[0].prompt_token_ids) == p
        last = responses[-1]
        assert last.finish_reason == "length" and last.usage.completion_tokens == 8
        assert last.usage.prompt_tokens == len(p)
        assert 0 < last.timings.first_token_s <= last.timings.e2e_s
        t = last.timings
        # Structure only: which parts ran and what moved. Durations measured on different threads and processes
        # are never compared (on two shared cores any order of them can occur).
        assert t.kv_transfer_s > 0 and t.kv_export_s > 0 and t.kv_import_s > 0 and t.kv_wire_s >= 0
        assert t.kv_tail_s > 0 and t.prefill_s > 0 and t.decode_s > 0
        assert t.kv_wire_s + t.kv_import_s == pytest.approx(t.kv_transfer_s, abs=1e-6)  # one sum, one clock
        assert t.kv_transfer_bytes == len(p) * KV_BYTES_PER_TOKEN  # the whole prompt's KV, nothing twice
    assert disagg.pages_all_free() and colocated.pages_all_free()


def repeating_prompts() -> list[list[int]]:
    """Prompts whose n-grams recur, so prompt lookup drafts from the first decode step on."""
    rng = np.random.default_rng(4)
    out = []
    for n in (3, 5, 8):
        motif = [int(t) for t in rng.integers(0, TINY_GQA.vocab_size, n)]
        out.append(motif * 4 + motif[:2])
    return out


def test_speculative_decoding_streams_the_same_tokens_and_hits_the_prefix_cache(speculative, colocated):
    """Disaggregated with speculation against colocated without: the same greedy and seeded tokens; the same
    prompt again hits the prefix cache and still streams the same tokens."""
    for sampling in ({"temperature": 0.0}, {"temperature": 0.8, "seed": 5}):
        for p in repeating_prompts():
            want = tokens_of(collect(colocated.stub, request(p, max_tokens=24, **sampling)))
            got = collect(speculative.stub, request(p, max_tokens=24, **sampling))
            assert tokens_of(got) == want and len(want) == 24
    p = repeating_prompts()[1]
    again = collect(speculative.stub, request(p, max_tokens=24))
    assert again[-1].usage.cached_prompt_tokens > 0
    assert tokens_of(again) == tokens_of(collect(colocated.stub, request(p, max_tokens=24)))
    t = again[-1].timings  # the request's own draft and accepted counts
    assert t.spec_draft_tokens > 0 and 0 < t.spec_accepted_tokens <= t.spec_draft_tokens
    drafted = scrape_metric(speculative.metrics_port, "pdserve_spec_draft_tokens_total")
    accepted = scrape_metric(speculative.metrics_port, "pdserve_spec_accepted_tokens_total")
    assert drafted >= t.spec_draft_tokens and t.spec_accepted_tokens <= accepted <= drafted
    steps = scrape_metric(speculative.metrics_port, "pdserve_spec_accepted_tokens_per_step_count")
    assert (
        steps > 0 and scrape_metric(speculative.metrics_port, "pdserve_spec_accepted_tokens_per_step_sum") == accepted
    )
    assert speculative.pages_all_free() and colocated.pages_all_free()


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "token_ids"),
        (pb.GenerateRequest(text=""), "text"),
        (request([1, 2, 10_000]), "token_ids"),
        (request([1] * 249, max_tokens=10), "max_tokens"),
        (request([1, 2], temperature=-0.5), "temperature"),
        (request([1, 2], top_p=1.5), "top_p"),
        (request([1, 2], top_p=0.0), "top_p"),
        (request([1, 2], top_k=-1), "top_k"),
        (request([1, 2], stop=[f"s{i}" for i in range(17)]), "stop"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(disagg, req, field):
    with pytest.raises(grpc.RpcError) as e:
        collect(disagg.stub, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


def test_request_that_never_fits_is_invalid_argument(colocated):
    with pytest.raises(grpc.RpcError) as e:
        collect(colocated.stub, request([5] * 200, max_tokens=8))  # 13 pages > the worker's 11
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "KV pages" in e.value.details()
    assert colocated.pages_all_free()


def test_cancel_mid_stream_frees_pages_on_both_workers(disagg):
    call = disagg.stub.Generate(request([1, 2, 3, 4, 5, 6], max_tokens=200), timeout=120)
    received = [next(call) for _ in range(3)]
    assert all(len(r.token_ids) == 1 for r in received)
    call.cancel()
    assert disagg.pages_all_free()


def test_deadline_exceeded_frees_pages(disagg):
    # the server's decode steps each pause >= 20 ms (SLOW_DECODE), so 210 tokens cannot finish within 1 s on any
    # machine: the deadline passes mid-request, wherever it is then
    with pytest.raises(grpc.RpcError) as e:
        collect(disagg.stub, request([7] * 40, max_tokens=210), timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert disagg.pages_all_free()


def test_model_info_and_cluster_status(disagg, colocated):
    info = disagg.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.vocab_size, info.context_window_size, info.mode) == (160, 256, "disaggregated")
    assert colocated.stub.GetModelInfo(pb.GetModelInfoRequest()).mode == "colocated"
    workers = disagg.stub.GetClusterStatus(pb.GetClusterStatusRequest()).workers
    assert sorted(w.role for w in workers) == ["decode", "prefill"]
    for w in workers:  # the KV cache's memory: its dtype, every page of every layer
        assert (w.kv_dtype, w.kv_bytes_per_token, w.refused) == ("float32", KV_BYTES_PER_TOKEN, "")
        assert w.kv_cache_bytes == KV_BYTES_PER_TOKEN * 16 * w.total_pages  # page size 16


def test_health_and_reflection(disagg):
    health = health_pb2_grpc.HealthStub(disagg.channel)
    for service in ("", "pdserve.v1.Generation"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(disagg.channel)
    answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answers[0].list_services_response.service}
    assert "pdserve.v1.Generation" in names and "grpc.health.v1.Health" in names


def test_nothing_listens_beyond_loopback(disagg, colocated):
    assert listeners_beyond_loopback(disagg.tree_pids() | colocated.tree_pids()) == []


def test_cli_client_matches_local_generation(disagg, model_dir, cache_dir):
    env = {**os.environ, "PDSERVE_CACHE_DIR": str(cache_dir)}
    args = ["--prompt-ids", "3,1,4,1,5,9,2,6", "--max-tokens", "6", "--ignore-eos", "--json"]
    remote = subprocess.run(
        [sys.executable, "-m", "pdserve", "generate", "--addr", disagg.address, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    local = subprocess.run(
        [sys.executable, "-m", "pdserve", "generate", "--model", str(model_dir), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert remote.returncode == 0, remote.stderr
    assert local.returncode == 0, local.stderr
    r, lo = json.loads(remote.stdout), json.loads(local.stdout)
    assert r["token_ids"] == lo["token_ids"] and len(r["token_ids"]) == 6
    assert r["prompt_token_ids"] == [3, 1, 4, 1, 5, 9, 2, 6] and r["finish_reason"] == "length"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdserve",
            "generate",
            "--addr",
            disagg.address,
            "--prompt-ids",
            "1,2",
            "--top-k",
            "-2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "top_k" in bad.stderr


def test_prometheus_metrics(disagg):
    import urllib.request

    collect(disagg.stub, request([4, 5, 6], max_tokens=3))
    body = urllib.request.urlopen(f"http://127.0.0.1:{disagg.metrics_port}/metrics", timeout=10).read().decode()
    for name in (
        "pdserve_ttft_seconds_count",
        "pdserve_inter_token_latency_seconds_count",
        "pdserve_e2e_latency_seconds_count",
        "pdserve_queue_seconds_count",
        "pdserve_kv_transfer_bytes_total",
        "pdserve_kv_transfer_seconds_count",
        "pdserve_kv_transfer_failures_total",
        "pdserve_kv_free_pages",
        'pdserve_requests_total{outcome="finished"}',
    ):
        assert name in body, name
    finished = next(line for line in body.splitlines() if line.startswith('pdserve_requests_total{outcome="finished"}'))
    assert float(finished.split()[-1]) >= 1


def test_a_decode_worker_killed_mid_speculation_migrates_with_the_same_output(speculative, colocated):
    """Last for the `speculative` server: its decode worker is killed once the request streams (>= 95 steps of >=
    20 ms are left then, so it cannot finish first); the request migrates to the restarted worker, resumes with
    its tokens so far, speculates again, and the client gets exactly the tokens plain decoding gives."""
    p = repeating_prompts()[2]
    want = tokens_of(collect(colocated.stub, request(p, max_tokens=100)))
    call = speculative.stub.Generate(request(p, max_tokens=100), timeout=180)
    got, last = [], None
    for r in call:
        got += r.token_ids
        if len(got) >= 5:
            break
    for pid in speculative.pids("decode"):
        os.kill(pid, signal.SIGKILL)
    for r in call:
        got += r.token_ids
        last = r
    assert got == want and len(want) == 100  # none lost, none repeated, none changed
    assert last is not None and last.timings.migrations == 1 and last.timings.spec_draft_tokens > 0
    speculative.wait_alive("decode", 1, restarts_at_least=1)
    assert speculative.pages_all_free(60)
