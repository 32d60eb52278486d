"""Request tracing, metrics and the Grafana dashboard through a real `pdserve serve` (Ray on loopback, tiny model, 1 prefill + 2 decode
workers) with `--otlp-traces-endpoint` pointed at a real OTLP/HTTP receiver started here: one trace per request
on both fronts with its spans correctly parented, a client's `traceparent` as the root's parent, a `migration`
span when a decode worker is killed mid-stream, both fronts in the latency histograms, and a dashboard whose every
query names a metric the server exports."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TINY_GQA
from model_files import write_hf_dir
from prometheus_client.parser import text_string_to_metric_families
from reference import random_params
from serving import SLOW_DECODE, Server, assert_clean_exit, collect, request, scrape_metric, tokens_of, wait_until

from bench.otlp_sink import OtlpReceiver, Span
from kvtransfer.net import free_port
from llama_relax.kv_dtype import kv_bytes_per_token

PROMPT_LEN, CHUNK, MAX_TOKENS = 80, 32, 8  # 3 prefill forwards: [0, 32), [32, 64), [64, 80)
KV_BYTES_PER_TOKEN = kv_bytes_per_token(TINY_GQA, "float16")  # the serve default KV cache dtype
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture(scope="module")
def receiver():
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, compiled_gqa, cache_dir, receiver):
    model = write_hf_dir(tmp_path_factory.mktemp("trace-model"), TINY_GQA, random_params(TINY_GQA, seed=5))
    http_port, metrics_port = free_port(), free_port()
    flags = ["--model", str(model), "--max-total-seq-len", "1024", "--decode-workers", "2"]
    flags += ["--prefill-chunk-size", str(CHUNK), "--local-prefill-max-tokens", "0", "--inject-fault", SLOW_DECODE]
    flags += ["--otlp-traces-endpoint", receiver.endpoint, "--http-port", str(http_port)]
    flags += ["--metrics-port", str(metrics_port)]
    s = Server(flags, cache_dir)
    s.http_port, s.metrics_port = http_port, metrics_port
    yield s
    assert_clean_exit(s)


def prompt(seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, TINY_GQA.vocab_size, PROMPT_LEN)]


def http_completion(s: Server, ids: list[int], headers: dict | None = None, max_tokens: int = MAX_TOKENS) -> dict:
    body = json.dumps({"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{s.http_port}/v1/completions",
        body,
        {"Content-Type": "application/json", **(headers or {})},
    )
    return json.loads(urllib.request.urlopen(req, timeout=120).read())


def trace(receiver: OtlpReceiver, rid: str, names: set[str]) -> dict[str, list[Span]]:
    """The request's spans by name, once every name in `names` arrived (the exporter batches)."""
    spans = wait_until(
        lambda: (t := receiver.trace_of(rid)) and names <= {x.name for x in t} and t, what=f"the trace of {rid}"
    )
    by_name: dict[str, list[Span]] = {}
    for x in spans:
        by_name.setdefault(x.name, []).append(x)
    return by_name


def check_request_trace(spans: dict[str, list[Span]], parent_id: str = "") -> None:
    (root,) = spans["request"]
    assert root.parent_id == parent_id and root.service == "pdserve"
    a = root.attributes
    assert a["pdserve.prompt_tokens"] == PROMPT_LEN and a["pdserve.output_tokens"] == MAX_TOKENS
    assert a["pdserve.finish_reason"] == "length" and a["pdserve.attempts"] == 1 and a["pdserve.cached_tokens"] == 0
    assert a["pdserve.outcome"] == "finished"
    for name in ("queue", "prefill", "kv_transfer", "decode"):
        (child,) = spans[name]
        assert child.parent_id == root.span_id, name
        assert root.start_ns <= child.start_ns <= child.end_ns <= root.end_ns, name
    (prefill,) = spans["prefill"]
    chunks = sorted(spans["prefill_chunk"], key=lambda c: c.attributes["pdserve.tokens.begin"])
    assert all(c.parent_id == prefill.span_id for c in chunks)
    ranges = [(c.attributes["pdserve.tokens.begin"], c.attributes["pdserve.tokens.end"]) for c in chunks]
    assert ranges == [(0, 32), (32, 64), (64, 80)]  # the forwards tile the prompt, in order
    assert all(c.start_ns <= c.end_ns for c in chunks) and chunks[0].end_ns <= chunks[-1].start_ns
    (kv,) = spans["kv_transfer"]
    assert kv.attributes["pdserve.kv.bytes"] == PROMPT_LEN * KV_BYTES_PER_TOKEN
    assert kv.attributes["pdserve.kv.pieces"] >= 1 and kv.attributes["pdserve.kv.import_s"] > 0
    (decode,) = spans["decode"]
    assert decode.attributes["pdserve.decode.steps"] == MAX_TOKENS - 1
    assert "migration" not in spans


EVERY_SPAN = {"request", "queue", "prefill", "prefill_chunk", "kv_transfer", "decode"}


def test_a_grpc_and_an_http_request_each_give_one_trace_with_parented_spans(server, receiver):
    collect(server.stub, request(prompt(1), max_tokens=MAX_TOKENS, request_id="trace-grpc"))
    check_request_trace(trace(receiver, "trace-grpc", EVERY_SPAN))
    body = http_completion(server, prompt(2))
    rid = body["id"].removeprefix("cmpl-")
    assert body["usage"]["completion_tokens"] == MAX_TOKENS
    check_request_trace(trace(receiver, rid, EVERY_SPAN))
    assert len({s.trace_id for s in receiver.spans if s.name == "request"}) == len(
        [s for s in receiver.spans if s.name == "request"]
    )  # one trace per request


def test_a_client_traceparent_becomes_the_roots_parent_on_both_fronts(server, receiver):
    collect(
        server.stub,
        request(prompt(3), max_tokens=MAX_TOKENS, request_id="trace-parent"),
        metadata=(("traceparent", TRACEPARENT),),
    )
    spans = trace(receiver, "trace-parent", EVERY_SPAN)
    assert spans["request"][0].trace_id == TRACE_ID
    check_request_trace(spans, parent_id=PARENT_ID)
    other = f"00-{'ab' * 16}-{'cd' * 8}-01"
    rid = http_completion(server, prompt(4), {"traceparent": other})["id"].removeprefix("cmpl-")
    spans = trace(receiver, rid, EVERY_SPAN)
    assert spans["request"][0].trace_id == "ab" * 16
    check_request_trace(spans, parent_id="cd" * 8)


def test_both_fronts_show_in_the_latency_histograms(server):
    def counts() -> tuple[float, ...]:
        names = ("pdserve_ttft_seconds_count", "pdserve_inter_token_latency_seconds_count")
        names += ("pdserve_e2e_latency_seconds_count", "pdserve_requests_total")
        return tuple(scrape_metric(server.metrics_port, n) for n in names)

    before = counts()
    http_completion(server, prompt(5))
    after_http = counts()
    assert after_http == (before[0] + 1, before[1] + MAX_TOKENS - 1, before[2] + 1, before[3] + 1)
    collect(server.stub, request(prompt(6), max_tokens=MAX_TOKENS))
    after_grpc = counts()
    assert after_grpc == (after_http[0] + 1, after_http[1] + MAX_TOKENS - 1, after_http[2] + 1, after_http[3] + 1)
    with pytest.raises(grpc.RpcError):
        collect(server.stub, request([1, 2, 10_000]))
    assert scrape_metric(server.metrics_port, "pdserve_requests_total", 'outcome="invalid"') >= 1


DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "pdserve.json"


def exported_names(port: int) -> set[str]:
    """Every sample name the server's registry exports, also for metric families with no sample yet."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    names = set()
    for family in text_string_to_metric_families(body):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


def test_the_grafana_dashboard_queries_only_metrics_the_server_exports(server):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bpdserve_[a-z0-9_]+", e)}
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for wanted in ("TTFT", "TPOT", "ITL", "Admission queue", "Pool health", "restarts", "KV transfer", "hit rate"):
        assert wanted in titles, wanted
    assert "Migrations" in titles and len(used) >= 15
    missing = used - exported_names(server.metrics_port)
    assert not missing, f"the dashboard queries metrics the server does not export: {sorted(missing)}"


def test_a_decode_worker_killed_mid_stream_gives_a_migration_span(server, receiver):
    """Last in this module: it kills both decode workers once the request is decoding (>= 95 steps of >= 20 ms are
    left then, so it cannot finish first); Ray restarts them, and the request migrates to one of them."""
    want = tokens_of(collect(server.stub, request(prompt(7), max_tokens=100)))
    call = server.stub.Generate(request(prompt(7), max_tokens=100, request_id="trace-migrate"), timeout=180)
    got = [t for _, r in zip(range(5), call, strict=False) for t in r.token_ids]
    for pid in server.pids("decode"):
        os.kill(pid, signal.SIGKILL)
    got += [t for r in call for t in r.token_ids]
    assert got == want  # the client's stream went on: same tokens, none lost or repeated
    spans = trace(receiver, "trace-migrate", {"request", "migration", "decode"})
    (root,) = spans["request"]
    assert root.attributes["pdserve.attempts"] == 2 and root.attributes["pdserve.outcome"] == "finished"
    (migration,) = spans["migration"]
    assert migration.parent_id == root.span_id and migration.attributes["pdserve.migration.attempt"] == 2
    assert 5 <= migration.attributes["pdserve.migration.tokens_sent"] < 100
    assert root.start_ns <= migration.start_ns <= migration.end_ns <= root.end_ns
    server.wait_alive("decode", 2, restarts_at_least=2)
    assert server.pages_all_free(60)
