"""`pdserve bench --launch/--compare` end to end: real `pdserve serve` subprocesses (local Ray cluster on
loopback) with the tiny model, a short run, results.json and the plots."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_GQA
from model_files import write_hf_dir
from ray_cluster import LOOPBACK_ENV
from reference import random_params
from serving import Server, assert_clean_exit

from bench.cli import main
from kvtransfer.net import free_port

PCT = ("mean", "p50", "p90", "p99")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, compiled_gqa):
    return write_hf_dir(tmp_path_factory.mktemp("bench-model"), TINY_GQA, random_params(TINY_GQA, seed=5))


@pytest.fixture()
def serve_env(monkeypatch, cache_dir):
    """The launched servers inherit this process's environment: the test compile cache, Ray on loopback."""
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(cache_dir))
    for k, v in LOOPBACK_ENV.items():
        monkeypatch.setenv(k, v)


def check_run(run: dict, n: int, target_tokens: int, server_side: bool = True) -> None:
    """`server_side`: the gRPC API's own timings are there (an OpenAI server reports none)."""
    assert (run["completed"], run["failed"], run["failures_by_code"]) == (n, 0, {})
    assert run["total_output_tokens"] == run["expected_output_tokens"] == target_tokens  # --ignore-eos
    assert run["duration_s"] > 0 and run["request_throughput"] > 0 and run["output_token_throughput"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = run[key]
        assert all(stats[p] > 0 for p in PCT), key
        assert stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"], key
    assert run["ttft_ms"]["count"] == run["e2e_ms"]["count"] == n
    assert run["ttft_ms"]["max"] <= run["e2e_ms"]["max"] and run["ttft_ms"]["mean"] <= run["e2e_ms"]["mean"]
    assert all(t <= e for t, e in zip(run["samples_ms"]["ttft_ms"], run["samples_ms"]["e2e_ms"], strict=True))
    b = run["server_breakdown_s"]
    if not server_side:
        assert b is None
        return
    assert b["count"] == n and 0 < b["first_token_s"] <= b["e2e_s"] and b["decode_s"] > 0


def test_launch_writes_results_and_plots(model_dir, serve_env, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "--launch",
        f"--model {model_dir} --max-total-seq-len 1024 --local-prefill-max-tokens 0",
        "--num-prompts",
        "16",
        "--request-rate",
        "20",
        "--input-len",
        "40",
        "--output-len",
        "12",
        "--range-ratio",
        "0.5",
        "--ignore-eos",
        "--seed",
        "3",
        "--slo",
        "ttft=20000,tpot=5000",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "Time to first token, TTFT" in table and "Goodput" in table
    doc = json.loads((out / "results.json").read_text())
    assert doc["seed"] == 3 and doc["config"]["workload"]["num_prompts"] == 16 and doc["config"]["rates"] == [20.0]
    assert doc["argv"] == argv
    assert [s["exit_code"] for s in doc["servers"]] == [0] and doc["servers"][0]["mode"] == "disaggregated"
    (run,) = doc["runs"]
    targets = doc["workload"]["output_lens"]
    assert len(targets) == 16 and all(6 <= t <= 12 for t in targets)
    check_run(run, 16, sum(targets))
    assert run["completed"] + run["failed"] == 16
    assert run["total_input_tokens"] == doc["workload"]["total_prompt_tokens"]
    b = run["server_breakdown_s"]
    assert b["kv_transfer_s"] > 0  # disaggregated: the KV moved between workers
    assert b["kv_tail_s"] > 0 and b["kv_export_s"] > 0  # parts timed on other threads are never compared
    # SLOs 3 orders of magnitude above what the tiny model takes (ms): every request meets them on any machine
    assert run["goodput"] == pytest.approx(run["request_throughput"])
    for png in ("latency_cdf.png",):
        assert (out / png).stat().st_size > 1000
    assert (out / "server-A.log").exists()


def test_compare_replays_the_same_workload_on_both_servers(model_dir, serve_env, tmp_path, capsys):
    out = tmp_path / "cmp"
    flags = f"--model {model_dir} --max-total-seq-len 1024"
    argv = [
        "--compare",
        flags,
        f"{flags} --colocated 1",
        "--num-prompts",
        "8",
        "--sweep-rates",
        "inf,25,50",
        "--max-concurrency",
        "4",
        "--warmup",
        "2",
        "--input-len",
        "24",
        "--output-len",
        "6",
        "--ignore-eos",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "A vs B @ inf" in table and "B/A" in table and "rate sweep" in table
    doc = json.loads((out / "results.json").read_text())
    rates = ["inf", 25.0, 50.0]
    assert [(r["label"], r["request_rate"]) for r in doc["runs"]] == [(x, r) for x in "AB" for r in rates]
    assert [s["mode"] for s in doc["servers"]] == ["disaggregated", "colocated"]
    assert [s["exit_code"] for s in doc["servers"]] == [0, 0]
    for run in doc["runs"]:
        check_run(run, 8, 8 * 6)
        assert run["total_input_tokens"] == 8 * 24
    assert (out / "latency_cdf.png").exists() and (out / "sweep.png").exists()


def test_multiturn_compare_reuses_cached_turns_sends_less_kv_and_streams_the_same_tokens(
    model_dir, serve_env, tmp_path, capsys
):
    """`--dataset multiturn` against prefix caching on (A) and off (B), every prompt through the prefill worker:
    A serves most prompt tokens from its caches and sends only the KV the decode worker lacks; the tokens of
    every request are identical."""
    out = tmp_path / "multiturn"
    flags = f"--model {model_dir} --max-total-seq-len 2048 --local-prefill-max-tokens 0"
    argv = [
        *("--compare", flags, f"{flags} --no-prefix-cache", "--dataset", "multiturn"),
        *("--conversations", "3", "--turns", "3", "--system-len", "48", "--input-len", "20", "--output-len", "8"),
        *("--ignore-eos", "--out", str(out), "--no-progress"),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "Same tokens on A and B @ inf: 9/9 requests" in table and "Cached prompt tokens (%)" in table
    a, b = json.loads((out / "results.json").read_text())["runs"]
    for run in (a, b):
        check_run(run, 9, 9 * 8)
    assert a["cached_token_fraction"] > 0.4 and b["cached_token_fraction"] == 0
    assert 0 < a["kv_bytes_per_request"] < 0.6 * b["kv_bytes_per_request"]


def test_openai_backend_measures_a_launched_pdserve_against_a_running_openai_server(
    model_dir, serve_env, cache_dir, tmp_path, capsys
):
    """`--backend openai-completions --launch FLAGS --compare-addr URL`: A is launched with its HTTP API, B is a
    server that is already running (here another pdserve, colocated); the same requests go to both over HTTP."""
    port = free_port()
    other = Server(["--model", str(model_dir), "--colocated", "1", "--http-port", str(port)], cache_dir)
    try:
        out = tmp_path / "openai"
        argv = [
            *(
                "--launch",
                f"--model {model_dir} --max-total-seq-len 1024",
                "--compare-addr",
                f"http://127.0.0.1:{port}",
            ),
            *("--backend", "openai-completions", "--num-prompts", "6", "--input-len", "24", "--output-len", "6"),
            *("--ignore-eos", "--slo-grid", "ttft=0.5,60000;tpot=0.001,5000", "--out", str(out), "--no-progress"),
        ]
        assert main(argv) == 0
        table = capsys.readouterr().out
        assert "Metrics as vLLM's benchmark defines them" in table and "SLO attainment (%), A @ inf" in table
        doc = json.loads((out / "results.json").read_text())
        for run in doc["runs"]:
            check_run(run, 6, 6 * 6, server_side=False)
            assert run["total_input_tokens"] == 6 * 24
            assert run["slo_grid_attainment"][1][1] == 1.0 and run["slo_grid_attainment"][0][0] == 0.0
        assert (out / "slo_grid_inf.png").stat().st_size > 1000
    finally:
        assert_clean_exit(other)


def test_a_server_that_fails_to_start_is_one_line(serve_env, tmp_path, capsys):
    assert main(["--launch", f"--model {tmp_path / 'missing'}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pdserve: error: pdserve serve") and "exited early" in err[-1]
    assert "model path does not exist" in err[-1]


def test_fault_run_kills_a_decode_worker_and_reports_its_impact(model_dir, serve_env, tmp_path, capsys):
    """`--fault kill:decode@1.5s` against 1 prefill + 2 decode workers: every request completes (the killed
    worker's requests migrate), and the report names the fault, its pid and the latency spike."""
    out = tmp_path / "fault"
    flags = (
        f"--model {model_dir} --max-total-seq-len 1024 --decode-workers 2 --max-batch-size 8 "
        "--inject-fault decode_step:pause:0.02x100000000"
    )
    argv = [
        "--launch",
        flags,
        "--num-prompts",
        "12",
        "--input-len",
        "20",
        "--output-len",
        "150",
        "--ignore-eos",
        "--fault",
        "kill:decode@1.5s",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "Fault kill:decode@1.5s" in table and "Migrated requests" in table
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert (run["completed"], run["failed"]) == (12, 0), run["failure_examples"]
    (fault,) = run["faults"]
    assert fault["error"] == "" and fault["pid"] > 0 and fault["in_flight"] >= 1
    assert fault["migrated_requests"] >= 1 == min(1, run["migrated"])
    assert fault["worst_gap_after_ms"] > fault["itl_p50_before_ms"]
