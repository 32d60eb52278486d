"""`pdserve serve` flags are checked once (`router.config.ServeConfig`): every bad flag, and every bad combination,
is one line that names the flag, before anything starts; good flags build the options each part takes."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from engine.speculation import SpecMode
from llama_relax.errors import UserError
from router.cli import _serve_args
from router.config import ServeConfig, auto_batch_size


def parse(*flags: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    _serve_args(p)
    args = p.parse_args(["--cache-dir", "/tmp/pdserve-test-cache", *flags])
    return args


def config(*flags: str) -> ServeConfig:
    return ServeConfig.from_args(parse(*flags), lambda: pytest.fail("the default model must not be fetched"))


BAD = [
    (("--prefill-workers", "0"), "--prefill-workers"),
    (("--decode-workers", "-1"), "--decode-workers"),
    (("--colocated", "-1"), "--colocated"),
    (("--colocated", "2", "--decode-workers", "2"), "--colocated"),
    (("--colocated", "1", "--prefill-workers", "3"), "--colocated"),
    (("--threads-per-worker", "-2"), "--threads-per-worker"),
    (("--port", "70000"), "--port"),
    (("--http-port", "-1"), "--http-port"),
    (("--metrics-port", "65536"), "--metrics-port"),
    (("--max-total-seq-len", "0"), "--max-total-seq-len"),
    (("--max-batch-size", "-1"), "--max-batch-size"),
    (("--prefill-chunk-size", "0"), "--prefill-chunk-size"),
    (("--local-prefill-max-tokens", "-5"), "--local-prefill-max-tokens"),
    (("--kv-stream-tail", "-1"), "--kv-stream-tail"),
    (("--migration-limit", "-1"), "--migration-limit"),
    (("--max-queued-requests", "0"), "--max-queued-requests"),
    (("--kv-lease-s", "0"), "--kv-lease-s"),
    (("--stall-timeout", "-1"), "--stall-timeout"),
    (("--recovery-timeout", "nan"), "--recovery-timeout"),
    (("--max-queue-wait-s", "-0.5"), "--max-queue-wait-s"),
    (("--drain-timeout", "-1"), "--drain-timeout"),
    (("--otlp-traces-endpoint", "127.0.0.1:4318"), "--otlp-traces-endpoint"),
    (("--otlp-traces-endpoint", "ftp://x/v1/traces"), "--otlp-traces-endpoint"),
    (("--num-speculative-tokens", "0"), "--num-speculative-tokens"),
    (("--num-speculative-tokens", "33"), "--num-speculative-tokens"),
    (("--inject-fault", "decode_step:explode"), "--inject-fault"),
    (("--decode-stages", "0"), "--decode-stages"),
    (("--decode-workers", "3:1", "--slo", "ttft=500,itl=50"), "--decode-workers: MIN 3 > MAX 1"),
    (("--decode-workers", "0:2", "--slo", "ttft=500,itl=50"), "--decode-workers: must allow at least 1"),
    (("--prefill-workers", "1:x"), "--prefill-workers: expected N or MIN:MAX"),
    (("--slo", "ttft=500,itl=50"), "--slo: needs a range"),
    (("--decode-workers", "1:3"), "--decode-workers: a MIN:MAX range needs --slo"),
    (("--decode-workers", "1:3", "--slo", "ttft=500"), "--slo: give both"),
    (("--decode-workers", "1:3", "--slo", "ttft=5,itl=5", "--planner-interval-s", "0"), "--planner-interval-s"),
    (("--colocated", "1", "--decode-workers", "1:2", "--slo", "ttft=5,itl=5"), "--colocated"),
    (("--prefill-stages", "-1"), "--prefill-stages"),
    (("--stages", "2"), "--stages"),
    (("--colocated", "1", "--decode-stages", "2"), "--decode-stages"),
    (("--inject-fault", "decode_step:corrupt"), "kv_send only"),
]


@pytest.mark.parametrize(("flags", "named"), BAD, ids=[" ".join(f) for f, _ in BAD])
def test_every_bad_flag_is_one_line_naming_it(flags, named):
    with pytest.raises(UserError) as e:
        config("--model", "/nonexistent/model", *flags)
    message = str(e.value)
    assert named in message and "\n" not in message


def test_good_flags_build_every_part_by_keyword():
    c = config(
        *("--model", "/m/model.gguf", "--decode-workers", "2", "--max-total-seq-len", "4096"),
        *("--no-prefix-cache", "--kv-stream-tail", "32", "--otlp-traces-endpoint", "http://127.0.0.1:4318/v1/traces"),
    )
    w = c.worker_options()
    assert (w.model, w.max_batch_size, w.max_total_seq_len, w.kv_stream_tail) == ("/m/model.gguf", 16, 4096, 32)
    assert w.prefix_cache is False and w.kv_host == "127.0.0.1" and w.speculative is SpecMode.AUTO  # the default
    spec = config("--model", "m", "--speculative", "ngram", "--num-speculative-tokens", "4").worker_options()
    assert (spec.speculative, spec.num_speculative_tokens) == (SpecMode.NGRAM, 4)
    assert c.router.cache_aware is False and c.router.local_prefill_max_tokens == 0  # no cache: no local prefill
    assert (c.cluster.prefill_workers, c.cluster.decode_workers, c.cluster.colocated) == (1, 2, 0)
    assert c.grpc_calls == 16 * 2 + 256 + 16 and not c.open_api
    assert config("--model", "m", "--host", "0.0.0.0").open_api
    assert config("--model", "m", "--host", "0.0.0.0", "--api-key", "k").open_api is False
    assert auto_batch_size(100) == 1 and auto_batch_size(8192) == 32 and auto_batch_size(4096) == 16


def test_serve_with_a_bad_flag_prints_one_line_and_starts_nothing():
    r = subprocess.run(
        [sys.executable, "-m", "pdserve", "serve", "--model", "/nonexistent", "--max-batch-size", "-3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
    assert r.stderr.startswith("pdserve: error: --max-batch-size: must be >= 0")


def test_more_stages_than_layers_names_the_flag(tmp_path):
    from conftest import TINY_GQA
    from model_files import write_hf_dir
    from reference import random_params

    model = write_hf_dir(tmp_path, TINY_GQA, random_params(TINY_GQA, seed=1))
    with pytest.raises(UserError, match=r"^--decode-stages: must be at most the model's 2 layers, got 3$"):
        config("--model", str(model), "--decode-stages", "3")
    c = config("--model", str(model), "--decode-stages", "2", "--stage-placement", "spread")
    assert (c.cluster.decode_stages, c.cluster.prefill_stages, c.stage_placement.value) == (2, 1, "spread")
    assert c.cluster.num_processes == 3  # the prefill worker and the two decode stages compute


def test_a_range_turns_the_planner_on():
    from engine.messages import Role
    from router.planner import PoolRange

    c = config("--model", "m", "--decode-workers", "1:3", "--slo", "ttft=800,itl=60", "--planner-interval-s", "5")
    assert c.planner is not None and c.planner.ranges == {Role.DECODE: PoolRange(1, 3)}
    assert (c.planner.slo.ttft_s, c.planner.slo.itl_s, c.planner.interval_s) == (0.8, 0.06, 5.0)
    assert (c.cluster.decode_workers, c.cluster.most(Role.DECODE), c.cluster.prefill_workers) == (1, 3, 1)
    assert config("--model", "m", "--decode-workers", "2").planner is None  # a plain size: fixed
