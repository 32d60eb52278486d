"""The planner on a real autoscaling Ray cluster (#29): Ray's own autoscaler with its fake multi-node provider on
127.0.0.1 (the head offers one `decode` slot; a node type `decode_node` offers another, 0..1 of them), and
`pdserve serve --address ... --decode-workers 1:2 --slo ...` joined to it.

A load ramp (6 clients at once against 4 batch slots per worker; decode steps slowed to >= 20 ms so requests
overlap) grows the decode pool from 1 to 2:
the new worker's pending `decode` resource makes the autoscaler launch a node, and the router admits the worker
when it is up. Idling shrinks the pool back to 1: the newest worker is drained and stopped, and the autoscaler
terminates its idle node. Every request completes with the tokens of an unfailed run, the decisions are exported
as metrics, and no page leaks. (`ray stop --force` at the end, as Ray's own AutoscalingCluster does: the suite
runs serially.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import TINY_GQA
from model_files import write_hf_dir
from ray_cluster import LOOPBACK_ENV, listeners_beyond_loopback
from reference import random_params
from serving import SLOW_DECODE, Server, assert_clean_exit, collect, request, scrape_metric, tokens_of, wait_until

from kvtransfer.net import free_port


def _fake_cluster_config(head: dict, gcs_address: str) -> dict:
    """Ray's fake multi-node provider config (the shape of its example.yaml, which the wheel does not ship); its
    nodes join the head at `gcs_address` (the provider's default is port 6379)."""
    return {
        "cluster_name": "pdserve-fake",
        "max_workers": 1,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            "ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0},
            "decode_node": {
                "resources": {"CPU": 1, "decode": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 1,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "docker": {},
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{k: [] for k in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def _alive_nodes(address: str) -> int:
    code = "import ray; ray.init(address=%r, log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run(
        [sys.executable, "-c", code % address], capture_output=True, text=True, env={**os.environ, **LOOPBACK_ENV}
    )
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else -1


@pytest.fixture
def autoscaling_cluster(tmp_path):
    port = free_port()
    config = tmp_path / "fake.json"
    config.write_text(json.dumps(_fake_cluster_config({"CPU": 2, "prefill": 1, "decode": 1}, f"127.0.0.1:{port}")))
    env = {**os.environ, **LOOPBACK_ENV, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
    ray_cli = str(Path(sys.executable).parent / "ray")
    cmd = [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2"]
    cmd += [f"--autoscaling-config={config}", "--include-dashboard=false", "--resources", '{"prefill": 1, "decode": 1}']
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True)


def test_a_load_ramp_grows_the_decode_pool_and_idling_shrinks_it(autoscaling_cluster, tmp_path, cache_dir):
    address = autoscaling_cluster
    model = write_hf_dir(tmp_path / "model", TINY_GQA, random_params(TINY_GQA, seed=21))
    metrics = free_port()
    flags = ["--address", address, "--model", str(model), "--decode-workers", "1:2", "--slo", "ttft=5000,itl=1000"]
    flags += ["--planner-interval-s", "2", "--metrics-port", str(metrics), "--kv-cache-dtype", "float32"]
    flags += ["--max-total-seq-len", "1024", "--max-batch-size", "4", "--speculative", "off"]
    flags += ["--inject-fault", SLOW_DECODE]
    server = Server(flags, cache_dir, ready_timeout_s=300)
    prompts = [[(7 * i + j) % TINY_GQA.vocab_size for j in range(5 + i)] for i in range(6)]
    try:
        want = [tokens_of(collect(server.stub, request(p, max_tokens=12))) for p in prompts]  # one at a time
        assert _alive_nodes(address) == 1
        got: dict[int, list[int]] = {}
        stop = threading.Event()

        def load(i: int) -> None:  # a client keeps asking until told to stop (the ramp)
            while not stop.is_set():
                got[i] = tokens_of(collect(server.stub, request(prompts[i], max_tokens=12), timeout=300))
                assert got[i] == want[i], (i, got[i], want[i])

        clients = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(len(prompts))]
        for c in clients:
            c.start()
        wait_until(lambda: len([w for w in server.workers() if w.role == "decode" and w.alive]) == 2, 240, "2 decode")
        assert _alive_nodes(address) == 2  # the autoscaler launched a node for the new worker
        assert scrape_metric(metrics, "pdserve_planner_decisions_total", 'direction="up"') >= 1
        stop.set()
        for c in clients:
            c.join(300)
        assert sorted(got) == list(range(len(prompts)))  # every client got its tokens (asserted as they came)
        wait_until(lambda: len([w for w in server.workers() if w.role == "decode"]) == 1, 240, "back to 1 decode")
        assert scrape_metric(metrics, "pdserve_planner_decisions_total", 'reason="idle"') >= 1
        gauge = lambda: scrape_metric(metrics, "pdserve_pool_workers{", 'role="decode"')  # noqa: E731
        wait_until(lambda: gauge() == 1, 30, "the pool gauge at 1")  # refreshed every second
        wait_until(lambda: _alive_nodes(address) == 1, 240, "the idle node terminated")
        assert tokens_of(collect(server.stub, request(prompts[0], max_tokens=12))) == want[0]
        assert server.pages_all_free()
        assert "planner: decode up -> 2" in server.output() and "planner: decode down -> 1" in server.output()
        assert listeners_beyond_loopback(server.tree_pids()) == []
    finally:
        assert_clean_exit(server)
