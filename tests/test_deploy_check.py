"""`pdserve deploy check`: the shipped cluster YAMLs pass; a broken one gets every problem listed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deploy.check import check_file

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.mark.parametrize("name", ["aws.yaml", "onprem.yaml", "loopback.yaml"])
def test_shipped_configs_pass(name):
    assert check_file(DEPLOY / name) == []


def test_all_problems_are_listed(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "cluster_name: x\nprovider: {type: aws, region: us-west-2}\n"
        "available_node_types:\n"
        "  head: {resources: {}, node_config: {}, max_workers: 0, bogus_key: 1}\n"
        "  w: {resources: {prefill: 1}, node_config: {}, max_workers: many}\n"
        "head_node_type: head\nhead_start_ray_commands: ['ray start --head']\n"
    )
    findings = [str(f) for f in check_file(bad)]
    assert any("bogus_key" in f and "ray-schema" in f for f in findings)
    assert any("max_workers" in f and "integer" in f for f in findings)
    assert any("`decode`" in f for f in findings)
    assert any("pdserve serve --address auto" in f for f in findings)
    r = subprocess.run(
        [sys.executable, "-m", "pdserve", "deploy", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and f"{len(findings)} problem(s)" in r.stderr


def test_local_provider_needs_both_roles(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "cluster_name: x\nprovider: {type: local, head_ip: 10.0.0.1, worker_ips: [10.0.0.2]}\n"
        "head_start_ray_commands: ['ray start --head', 'pdserve serve --address auto']\n"
        "worker_start_ray_commands: ['ray start --address=$RAY_HEAD_IP:6379 --resources={\"decode\": 1}']\n"
    )
    assert [f.message for f in check_file(cfg) if "prefill" in f.message]


def test_not_yaml_is_one_clear_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("a: b: c\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        check_file(cfg)


def test_a_pipelined_pool_needs_its_stage_resource(tmp_path):
    cfg = tmp_path / "c.yaml"
    serve = "pdserve serve --address auto --decode-stages 2"
    cfg.write_text(
        "cluster_name: x\nprovider: {type: local, head_ip: 10.0.0.1, worker_ips: []}\n"
        f"head_start_ray_commands: ['ray start --head --resources={{\"prefill\": 1, \"decode\": 1}}', '{serve}']\n"
    )
    assert [f.message for f in check_file(cfg) if "`decode_stage`" in f.message and "--decode-stages 2" in f.message]
    cfg.write_text(cfg.read_text().replace('"decode": 1}', '"decode": 1, "decode_stage": 2}'))
    assert check_file(cfg) == []
