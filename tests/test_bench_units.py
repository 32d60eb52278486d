"""`pdserve bench` without a pdserve server: metric math on synthetic timelines, arrival statistics, workloads,
ShareGPT parsing, reports, argument errors, and the client against an in-process fake Generation service."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import pytest

from bench.arrivals import arrival_offsets, gaps
from bench.cli import main
from bench.client import BenchClient, ClientOptions
from bench.multiturn import Conversation, MultiturnSpec, build_conversations, run_conversations
from bench.openai_client import OpenAIBenchClient
from bench.report import RunOutcome, format_sweep, format_table, write_plots, write_results
from bench.slo_grid import SloGrid, compare_line
from bench.stats import SLO, Percentiles, RequestRecord, ServerTimings, compute_metrics, latency_samples_ms
from bench.workload import (
    BenchRequest,
    WorkloadSpec,
    approx_tokens,
    build_workload,
    parse_sharegpt,
    random_requests,
    sharegpt_requests,
    tokenizer_counter,
)
from protos import generate_pb2 as pb
from protos import generate_pb2_grpc as pb_grpc


# ---- metrics ---------------------------------------------------------------------------------------------------
def timeline() -> list[RequestRecord]:
    srv = ServerTimings(queue_s=0.01, prefill_s=0.02, kv_transfer_s=0.03, first_token_s=0.09, decode_s=0.4, e2e_s=0.49)
    srv2 = ServerTimings(queue_s=0.03, prefill_s=0.04, kv_transfer_s=0.01, first_token_s=0.05, decode_s=0.0, e2e_s=0.05)
    return [
        # 4 tokens: TTFT 100 ms, E2E 500 ms, TPOT (500 - 100) / 3 ms, ITLs 100, 100, 200 ms
        RequestRecord(0.0, 0.5, (0.1, 0.2, 0.3, 0.5), 4, 10, 4, server=srv),
        # 1 token: TTFT = E2E = 50 ms, no TPOT, no ITL
        RequestRecord(1.0, 1.05, (1.05,), 1, 20, 1, server=srv2),
        RequestRecord(0.2, 0.25, (), 0, 0, 8, "UNAVAILABLE", "connection refused"),
        RequestRecord(0.3, 1.9, (0.4, 0.41), 2, 0, 8, "DEADLINE_EXCEEDED", "deadline"),  # partial: not in stats
    ]


def test_metrics_on_a_known_timeline():
    m = compute_metrics(timeline(), duration_s=2.0)
    assert (m.completed, m.failed) == (2, 2)
    assert m.failures_by_code == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1}
    assert m.failure_examples["UNAVAILABLE"] == "connection refused"
    assert (m.total_input_tokens, m.total_output_tokens, m.expected_output_tokens) == (30, 5, 5)
    assert m.request_throughput == pytest.approx(1.0)
    assert m.output_token_throughput == pytest.approx(2.5)
    assert m.total_token_throughput == pytest.approx(17.5)
    assert m.ttft_ms.mean == pytest.approx(75.0) and m.ttft_ms.p50 == pytest.approx(75.0)
    assert m.ttft_ms.p90 == pytest.approx(95.0) and m.ttft_ms.p99 == pytest.approx(99.5)
    assert m.tpot_ms.count == 1 and m.tpot_ms.mean == pytest.approx(400.0 / 3)
    assert m.itl_ms.count == 3 and m.itl_ms.mean == pytest.approx(400.0 / 3) and m.itl_ms.p50 == pytest.approx(100)
    assert m.e2e_ms.mean == pytest.approx(275.0) and m.e2e_ms.max == pytest.approx(500.0)
    assert m.goodput is None and m.slo_attainment is None
    b = m.server_breakdown_s
    assert b.count == 2 and b.queue_s == pytest.approx(0.02) and b.kv_transfer_s == pytest.approx(0.02)
    assert b.first_token_s == pytest.approx(0.07) and b.decode_s == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("slo", "goodput"),
    [
        ("ttft=80", 0.5),  # the 4-token request misses (100 ms)
        ("ttft=100", 1.0),
        ("tpot=100", 0.5),  # 133 ms misses; the 1-token request has no TPOT and meets it
        ("tpot=150", 1.0),
        ("ttft=200,tpot=100", 0.5),
        ("e2e=40", 0.0),
        ("ttft=40", 0.0),
    ],
)
def test_goodput_counts_requests_meeting_every_given_slo(slo, goodput):
    m = compute_metrics(timeline(), duration_s=2.0, slo=SLO.parse(slo))
    assert m.goodput == pytest.approx(goodput)
    assert m.slo_attainment == pytest.approx(goodput * 2.0 / 4)  # of all 4 requests, failures included


def test_all_failed_run_has_no_latency_stats():
    m = compute_metrics([RequestRecord(0.0, 0.1, error="RESOURCE_EXHAUSTED")], duration_s=0.1)
    assert (m.completed, m.failed, m.ttft_ms, m.tpot_ms, m.itl_ms, m.e2e_ms) == (0, 1, None, None, None, None)
    assert m.server_breakdown_s is None and m.request_throughput == 0.0
    assert Percentiles.of_seconds([]) is None


def test_latency_samples_are_per_completed_request():
    s = latency_samples_ms(timeline())
    assert s["ttft_ms"] == pytest.approx([100.0, 50.0]) and s["e2e_ms"] == pytest.approx([500.0, 50.0])
    assert s["tpot_ms"] == pytest.approx([400.0 / 3])


@pytest.mark.parametrize("text", ["foo=1", "ttft", "ttft=x", "ttft=-1", "ttft=1,ttft=2", "tpot=inf"])
def test_bad_slo_is_a_value_error(text):
    with pytest.raises(ValueError, match="--slo"):
        SLO.parse(text)


def test_slo_parse():
    assert SLO.parse("ttft=200, tpot=50") == SLO(ttft_ms=200.0, tpot_ms=50.0)
    assert not SLO.parse(None).given and SLO.parse("e2e=1").given


# ---- arrivals --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("burstiness", [0.25, 0.5, 1.0, 2.0, 8.0])
def test_gamma_gaps_have_the_right_mean_and_cv(burstiness):
    g = gaps(40_000, rate=5.0, burstiness=burstiness, seed=3)
    assert g.mean() == pytest.approx(0.2, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_arrivals_are_reproducible_and_scale_with_the_rate():
    a = arrival_offsets(100, 4.0, 1.0, seed=7)
    assert np.array_equal(a, arrival_offsets(100, 4.0, 1.0, seed=7))
    assert not np.array_equal(a, arrival_offsets(100, 4.0, 1.0, seed=8))
    assert len(a) == 100 and a[0] == 0.0 and np.all(np.diff(a) >= 0)
    assert np.allclose(arrival_offsets(100, 8.0, 1.0, seed=7), a / 2)  # a sweep replays the same pattern
    assert np.array_equal(arrival_offsets(5, math.inf, 1.0, seed=7), np.zeros(5))
    assert len(arrival_offsets(1, 1.0, 1.0, 0)) == 1 and len(arrival_offsets(0, 1.0, 1.0, 0)) == 0


@pytest.mark.parametrize(("rate", "b"), [(0.0, 1.0), (-1.0, 1.0), (math.nan, 1.0), (1.0, 0.0), (1.0, math.inf)])
def test_bad_rate_or_burstiness(rate, b):
    with pytest.raises(ValueError):
        gaps(3, rate, b, 0)


# ---- workloads -------------------------------------------------------------------------------------------------
def test_random_workload_is_reproducible_and_respects_lengths():
    spec = WorkloadSpec("random", num_prompts=200, input_len=100, output_len=40, range_ratio=0.5, seed=11)
    w = random_requests(spec, vocab_size=160, context_window=256)
    assert w == random_requests(spec, 160, 256)
    assert w != random_requests(WorkloadSpec("random", 200, 100, 40, 0.5, seed=12), 160, 256)
    assert len(w.requests) == 200
    ins = [r.prompt_len for r in w.requests]
    outs = [r.output_len for r in w.requests]
    assert min(ins) >= 50 and max(ins) <= 100 and len(set(ins)) > 20
    assert min(outs) >= 20 and max(outs) <= 40
    for r in w.requests:
        assert len(r.token_ids) == r.prompt_len and r.text is None
        assert all(0 <= t < 160 for t in r.token_ids)
    assert w.total_prompt_tokens == sum(ins)


def test_fixed_workload_and_long_fraction():
    fixed = random_requests(WorkloadSpec("fixed", 10, 30, 7, range_ratio=0.9), 50, 256)
    assert {(r.prompt_len, r.output_len) for r in fixed.requests} == {(30, 7)}
    spec = WorkloadSpec("random", 40, 20, 8, long_fraction=0.25, long_input_len=200, seed=1)
    mixed = random_requests(spec, 160, 256)
    assert sorted(r.prompt_len for r in mixed.requests) == [20] * 30 + [200] * 10


def test_workload_that_does_not_fit_the_context_is_refused():
    with pytest.raises(ValueError, match="context window"):
        random_requests(WorkloadSpec("random", 4, 200, 100), 160, 256)
    with pytest.raises(ValueError, match="context window"):
        random_requests(WorkloadSpec("random", 4, 20, 10, long_fraction=0.5, long_input_len=250), 160, 256)


@pytest.mark.parametrize(
    "kw",
    [
        {"num_prompts": 0},
        {"input_len": 0},
        {"range_ratio": 1.0},
        {"long_fraction": 0.5},
        {"long_fraction": 1.5, "long_input_len": 9},
        {"dataset": "sharegpt"},
        {"dataset": "nope"},
    ],
)
def test_bad_workload_spec(kw):
    with pytest.raises(ValueError):
        WorkloadSpec(**kw)


def conv(*turns: tuple[str, object]) -> dict:
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


def sharegpt_entries() -> list[object]:
    return [
        conv(("human", "one two three four"), ("gpt", "a b c d e f g h i j")),
        conv(("system", "be nice"), ("human", "hi there"), ("gpt", "hello")),  # first human turn after system
        conv(("gpt", "unprompted"), ("human", "q"), ("gpt", "answer here")),
        "not a dict",  # malformed
        {"id": "no conversations"},  # malformed
        {"conversations": "not a list"},  # malformed
        conv(("human", "only a question")),  # malformed: no reply
        conv(("human", "   "), ("gpt", "empty prompt")),  # malformed: empty prompt
        conv(("human", "numeric reply"), ("gpt", 42)),  # malformed: reply not text
        conv(("human", "word " * 150), ("gpt", "word " * 60)),  # 195 + 78 tokens: longer than 256
    ]


def test_sharegpt_parser_skips_and_counts_malformed_entries():
    reqs, malformed, too_long = parse_sharegpt(sharegpt_entries(), context_window=256)
    assert (len(reqs), malformed, too_long) == (3, 6, 1)
    assert [r.text for r in reqs] == ["one two three four", "hi there", "q"]
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(5, 13), (3, 1), (1, 3)]  # round(1.3 * words)
    assert approx_tokens("") == 1
    reqs, _, _ = parse_sharegpt(sharegpt_entries(), 256, count=len)  # a "tokenizer": one token per character
    assert (reqs[0].prompt_len, reqs[0].output_len) == (18, 19)


def test_sharegpt_file_is_shuffled_with_the_seed(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(sharegpt_entries() * 4), encoding="utf-8")
    spec = WorkloadSpec("sharegpt", num_prompts=5, dataset_path=path, seed=3)
    w = sharegpt_requests(spec, 256)
    assert len(w.requests) == 5 and (w.skipped_malformed, w.skipped_too_long) == (24, 4)
    assert w == sharegpt_requests(spec, 256) and w.length_source == "words*1.3"
    assert all(r.text and not r.token_ids for r in w.requests)
    every = build_workload(WorkloadSpec("sharegpt", num_prompts=1000, dataset_path=path), 160, 256)
    assert len(every.requests) == 12  # fewer usable entries than asked for: all of them


def test_sharegpt_lengths_with_the_models_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text("{}")
    count = tokenizer_counter(tmp_path)
    assert count("hello world and more") == 4
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(sharegpt_entries()), encoding="utf-8")
    w = sharegpt_requests(WorkloadSpec("sharegpt", dataset_path=path), 256, count)
    assert w.length_source == "tokenizer"
    assert sorted(r.output_len for r in w.requests) == [1, 2, 10, 60]  # 150 words + 60 fit now
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer"):
        tokenizer_counter(tmp_path)


def test_sharegpt_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        sharegpt_requests(WorkloadSpec("sharegpt", dataset_path=bad), 256)
    bad.write_text(json.dumps({"conversations": []}), encoding="utf-8")
    with pytest.raises(ValueError, match="JSON list"):
        sharegpt_requests(WorkloadSpec("sharegpt", dataset_path=bad), 256)
    bad.write_text(json.dumps(["x", {}]), encoding="utf-8")
    with pytest.raises(ValueError, match="no usable conversations"):
        sharegpt_requests(WorkloadSpec("sharegpt", dataset_path=bad), 256)


# ---- reports ---------------------------------------------------------------------------------------------------
def outcomes() -> list[RunOutcome]:
    recs = timeline()
    slo = SLO.parse("ttft=80")
    return [
        RunOutcome(
            label,
            "127.0.0.1:1",
            "--colocated 1" if label == "B" else "",
            rate,
            compute_metrics(recs, 2.0 * k, slo),
            latency_samples_ms(recs),
        )
        for label, k in (("A", 1.0), ("B", 2.0))
        for rate in (1.0, 4.0, math.inf)
    ]


def test_tables_name_every_metric_and_the_ratio():
    runs = outcomes()
    side = format_table([runs[0], runs[3]], "A vs B")
    for word in (
        "TTFT",
        "Time to first token",
        "Time per output token",
        "Inter-token",
        "End-to-end",
        "Goodput",
        "B/A",
        "UNAVAILABLE: 1",
        "KV transfer",
        "0.50x",
    ):
        assert word in side, word
    sweep = format_sweep(runs)
    assert "TTFT p99" in sweep and "inf" in sweep and len(sweep.splitlines()) == 5 + 6


def test_results_json_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    runs = outcomes()
    path = write_results(tmp_path, {"seed": 1, "config": {"rates": ["inf"], "out": tmp_path}}, runs)
    doc = json.loads(path.read_text())
    assert len(doc["runs"]) == 6 and doc["runs"][2]["request_rate"] == "inf"
    run = doc["runs"][0]
    for key in (
        "completed",
        "failed",
        "failures_by_code",
        "duration_s",
        "request_throughput",
        "output_token_throughput",
        "goodput",
        "server_breakdown_s",
        "samples_ms",
    ):
        assert key in run, key
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(run[key]) >= {"mean", "p50", "p90", "p99"}
    names = sorted(p.name for p in write_plots(tmp_path, runs))
    assert names == ["latency_cdf.png", "sweep.png"]
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)


# ---- command line errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--addr", "nohost"], "--addr"),
        (["--addr", "127.0.0.1:1", "--sweep-rates", "1,x"], "rate"),
        (["--addr", "127.0.0.1:1", "--request-rate", "0"], "rate"),
        (["--addr", "127.0.0.1:1", "--slo", "bogus=1"], "--slo"),
        (["--addr", "127.0.0.1:1", "--dataset", "sharegpt"], "--dataset-path"),
        (["--addr", "127.0.0.1:1", "--dataset", "sharegpt", "--dataset-path", "/nonexistent.json"], "no such file"),
        (["--addr", "127.0.0.1:1", "--max-concurrency", "0"], "--max-concurrency"),
        (["--addr", "127.0.0.1:1", "--num-prompts", "2", "--no-progress"], "GetModelInfo"),  # nothing listens
        (["--launch", "--model 'unbalanced"], "serve flags"),
        (["--addr", "127.0.0.1:1", "--rate-schedule", "0:1", "--request-rate", "2"], "not --request-rate and"),
        (["--addr", "127.0.0.1:1", "--rate-schedule", "10:1"], "--rate-schedule: the first segment"),
    ],
)
def test_errors_are_one_line_and_exit_2(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pdserve: error:") and words in err[0], err


# ---- client against a fake Generation service ------------------------------------------------------------------
class FakeGeneration(pb_grpc.GenerationServicer):
    """Streams max_tokens one-token messages 2 ms apart; prompt [999, ...] -> RESOURCE_EXHAUSTED."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = self.peak = 0

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(model="fake", vocab_size=1000, context_window_size=4096, mode="colocated")

    def Generate(self, request, context):
        if request.token_ids.ids[0] == 999:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV pages exhausted")
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            n = request.sampling.max_tokens
            for i in range(n):
                time.sleep(0.002)
                last = i == n - 1
                yield pb.GenerateResponse(
                    token_ids=[i],
                    finish_reason="length" if last else "",
                    usage=pb.Usage(prompt_tokens=len(request.token_ids.ids), completion_tokens=n) if last else None,
                    timings=pb.Timings(first_token_s=0.002, e2e_s=0.002 * n) if last else None,
                )
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture()
def fake_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    servicer = FakeGeneration()
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def test_client_records_timelines_failures_and_caps_concurrency(fake_server):
    addr, servicer = fake_server
    reqs = [BenchRequest(3, 5, (1, 2, 3))] * 10 + [BenchRequest(2, 5, (999, 1))] * 2
    with BenchClient(addr, ClientOptions(max_concurrency=3, progress=False)) as client:
        assert client.info().vocab_size == 1000
        result = client.run(reqs, [0.0] * len(reqs))
    assert servicer.peak <= 3
    m = compute_metrics(result.records, result.duration_s)
    assert (m.completed, m.failed, m.failures_by_code) == (10, 2, {"RESOURCE_EXHAUSTED": 2})
    assert m.total_output_tokens == m.expected_output_tokens == 50 and m.total_input_tokens == 30
    assert m.itl_ms.count == 40 and m.ttft_ms.p50 <= m.e2e_ms.p50
    assert m.server_breakdown_s.first_token_s == pytest.approx(0.002)


def test_client_follows_the_arrival_schedule_and_the_deadline(fake_server):
    addr, _ = fake_server
    with BenchClient(addr, ClientOptions(progress=False)) as client:
        t0 = time.perf_counter()
        result = client.run([BenchRequest(1, 2, (1,))] * 3, [0.0, 0.15, 0.3])
        assert time.perf_counter() - t0 >= 0.3
        sends = [r.sent - t0 for r in result.records]
        # never early (a late send is the machine's scheduling, not the schedule's): order and lower bounds only
        assert 0 <= sends[0] <= sends[1] <= sends[2] and sends[1] >= 0.15 - 1e-3 and sends[2] >= 0.3 - 1e-3
    with BenchClient(addr, ClientOptions(request_timeout_s=0.05, progress=False)) as client:
        result = client.run([BenchRequest(1, 200, (1,))], [0.0])  # 200 tokens x >= 2 ms of sleep > 50 ms
    assert result.records[0].error == "DEADLINE_EXCEEDED" and result.records[0].output_tokens < 200


def test_multiturn_conversations_share_the_system_prompt_and_are_reproducible():
    spec = MultiturnSpec(conversations=3, turns=4, system_len=40, user_len=10, answer_len=6, range_ratio=0.5, seed=2)
    convs = build_conversations(spec, vocab_size=500, context_window=4096)
    assert convs == build_conversations(spec, 500, 4096)
    assert len(convs) == 3 and all(c.system == convs[0].system and len(c.system) == 40 for c in convs)
    assert all(len(c.users) == len(c.answer_lens) == 4 for c in convs)
    assert all(5 <= len(u) <= 10 for c in convs for u in c.users) and all(
        3 <= a <= 6 for c in convs for a in c.answer_lens
    )
    assert convs[0].users != convs[1].users
    with pytest.raises(ValueError, match="context window"):
        build_conversations(spec, 500, 100)
    with pytest.raises(ValueError, match="--turns"):
        MultiturnSpec(turns=0)


def test_a_conversation_sends_each_turn_after_the_answer_with_the_history(fake_server):
    """Turn k's prompt is the system prompt + every earlier user message and answer + the new message; a failed
    turn ends its conversation and the turns after it are recorded as not sent."""
    addr, _ = fake_server
    spec = MultiturnSpec(conversations=2, turns=3, system_len=5, user_len=4, answer_len=3)
    convs = list(build_conversations(spec, 500, 4096))
    convs[1] = Conversation((999, *convs[1].system[1:]), convs[1].users, convs[1].answer_lens)  # refused
    with BenchClient(addr, ClientOptions(progress=False)) as client:
        result = run_conversations(client, convs, [0.0, 0.0])
    recs = result.records
    assert [r.prompt_tokens for r in recs[:3]] == [5 + 4, 5 + 4 + 3 + 4, 5 + 2 * (4 + 3) + 4]
    assert all(r.ok and r.output_ids == (0, 1, 2) for r in recs[:3])
    assert [r.error for r in recs[3:]] == ["RESOURCE_EXHAUSTED", "NOT_SENT", "NOT_SENT"]


def test_slo_grid_attainment_counts_failures_as_missed_and_names_the_winner():
    grid = SloGrid.parse("ttft=100,1000;tpot=10,100")
    fast_first = RequestRecord(0.0, 1.0, (0.05, 0.55, 1.0), 3, 5, 3)  # TTFT 50 ms, TPOT 475 ms
    fast_decode = RequestRecord(0.0, 0.61, (0.6, 0.605, 0.61), 3, 5, 3)  # TTFT 600 ms, TPOT 5 ms
    failed = RequestRecord(0.0, 0.1, (), 0, 0, 3, "UNAVAILABLE")
    a = grid.attainment([fast_first, fast_first, failed, failed])
    b = grid.attainment([fast_decode, fast_decode, fast_decode, failed])
    assert a == ((0.0, 0.0), (0.0, 0.0))  # TPOT 475 ms meets no TPOT limit here
    assert b == ((0.0, 0.0), (0.75, 0.75))
    line = compare_line("A", "B", a, b)
    assert "A meets more requests' SLOs in 0 of 4 cells (by up to 0 points), B in 2 (by up to 75); 2 tie" in line
    for bad in ("ttft=1", "ttft=a;tpot=1", "ttft=-1;tpot=1", "tpot=1;tpot=2"):
        with pytest.raises(ValueError, match="--slo-grid"):
            SloGrid.parse(bad)


class FakeOpenAI(BaseHTTPRequestHandler):
    """An OpenAI-compatible server: streams one SSE chunk per token, 2 ms apart, then a usage chunk; a prompt that
    starts with 999 gets 429; one that starts with 998 breaks with an error event after one token."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps({"data": [{"id": "fake", "meta": {"n_vocab": 1000, "n_ctx_train": 4096}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.seen.append((self.path, req, self.headers.get("Authorization")))
        prompt = req.get("prompt") or req["messages"][0]["content"]
        first = int(prompt.split()[0]) if isinstance(prompt, str) else prompt[0]
        if first == 999:
            self.send_response(429)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chat = "messages" in req
        n = req["max_tokens"]
        for i in range(n):
            time.sleep(0.002)
            if first == 998 and i == 1:
                self.wfile.write(b'data: {"error": {"message": "boom", "type": "internal_error", "code": "x"}}\n\n')
                return
            choice = {"delta": {"content": f"t{i}"}} if chat else {"text": f"t{i}"}
            choice["finish_reason"] = "length" if i == n - 1 else None
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            self.wfile.flush()
        n_prompt = len(prompt.split()) if isinstance(prompt, str) else len(prompt)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "prompt_tokens_details": {"cached_tokens": 1}}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture
def fake_openai():
    FakeOpenAI.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeOpenAI.seen
    server.shutdown()


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_openai_client_records_streams_usage_and_errors(fake_openai, chat):
    url, seen = fake_openai
    reqs = [BenchRequest(3, 4, (1, 2, 3))] * 3 + [BenchRequest(2, 4, (999, 1)), BenchRequest(2, 4, (998, 1))]
    options = ClientOptions(backend="openai-chat" if chat else "openai-completions", ignore_eos=True, progress=False)
    client = OpenAIBenchClient(url, options, chat, api_key="k", detokenize=lambda ids: " ".join(map(str, ids)))
    info = client.info()
    assert (info.model, info.vocab_size, info.context_window_size) == ("fake", 1000, 4096)
    result = client.run(reqs, [0.0] * len(reqs))
    m = compute_metrics(result.records, result.duration_s)
    assert (m.completed, m.failures_by_code) == (3, {"HTTP_429": 1, "x": 1})
    assert m.total_output_tokens == 12 and m.itl_ms.count == 9 and m.ttft_ms.p50 <= m.e2e_ms.p50
    assert m.cached_token_fraction == pytest.approx(1 / 3)
    # the five requests run concurrently: find one of the three (1, 2, 3) prompts, whichever came first
    plain = [x for x in seen if (x[1]["messages"][0]["content"] if chat else x[1]["prompt"]) in ("1 2 3", [1, 2, 3])]
    assert len(plain) == 3 and len(seen) == 5
    path, body, auth = plain[0]
    assert path == ("/v1/chat/completions" if chat else "/v1/completions") and auth == "Bearer k"
    assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["ignore_eos"]
    assert (body["messages"][0]["content"] == "1 2 3") if chat else (body["prompt"] == [1, 2, 3])


# ---- grounded prompts and output mismatches (#26) ---------------------------------------------------------------
def test_grounded_prompts_alternate_code_edits_and_quote_backs_near_the_asked_length():
    from bench.grounded import grounded_requests

    spec = WorkloadSpec(dataset="grounded", num_prompts=6, input_len=300, output_len=100, seed=3)
    w = build_workload(spec, 1000, 2048)
    assert len(w.requests) == 6 and all(r.text and r.chat and r.output_len == 100 for r in w.requests)
    assert [r.text.startswith("Rewrite this Python function") for r in w.requests] == [True, False] * 3
    assert all("<<<BEGIN>>>" in r.text and "<<<END>>>" in r.text for r in w.requests[1::2])
    for r in w.requests[::2]:  # the parameter named in the instruction is in the code
        old = r.text.split("`")[1]
        assert f"{old}_renamed" in r.text and old in r.text.split("```python")[1]
    assert all(150 <= r.prompt_len <= 300 for r in w.requests)  # words * 1.3 here: whole lines within budget
    assert grounded_requests(spec, 2048) == w  # the seed fixes the prompts
    assert grounded_requests(dataclasses.replace(spec, seed=4), 2048) != w
    with pytest.raises(ValueError, match="--input-len"):
        grounded_requests(dataclasses.replace(spec, input_len=2048), 2048)


def test_mismatch_margins_come_from_the_model_at_the_first_differing_token(tmp_path, cache_dir):
    from conftest import TINY_GQA
    from model_files import write_hf_dir
    from reference import NumpyLlama, random_params

    from bench.margins import TIE, first_difference, mismatch_line, mismatches

    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1 and first_difference([1, 2], [1, 2, 3]) == 2
    params = random_params(TINY_GQA, seed=8)
    model = write_hf_dir(tmp_path / "m", TINY_GQA, params)
    prompts = [(3, 4, 5), (6, 7), (8, 9)]
    a = [(10, 11, 12), (13, 14), (20,)]
    b = [(10, 11, 40), (13, 14), (21,)]  # request 1 agrees
    found = mismatches(prompts, a, b, str(model), cache_dir)
    assert [(m.request, m.position) for m in found] == [(0, 2), (2, 0)]
    ref = NumpyLlama(TINY_GQA, params)
    for m, ids in zip(found, ([3, 4, 5, 10, 11], [8, 9]), strict=True):
        logits = ref.forward(m.request, ids)[-1]
        top2 = np.sort(logits)[-2:]
        assert m.margin == pytest.approx(top2[1] - top2[0], abs=2e-3)
    assert mismatch_line(found, 3).startswith("Token mismatches: 2/3 requests; near-ties")
    assert ("NOT near-ties: 2" in mismatch_line(found, 3)) == all(m.margin >= TIE for m in found)
