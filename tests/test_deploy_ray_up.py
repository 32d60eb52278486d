"""`ray up` of deploy/loopback.yaml for real: Debian's sshd on 127.0.0.1 with a throwaway key, Ray's local
provider, the gRPC health check, one generated request, `ray down`, and nothing left listening or running.

Needs root, sshd and rsync (.ci/run installs them). The ssh login is a temporary alias account of root whose home
is a temp dir, so the `ray` that `ray down` runs through a login shell comes from that home's ~/.bashrc and
nothing of the real root's dotfiles changes; the account is removed at the end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
import pytest
from conftest import TINY_GQA
from grpc_health.v1 import health_pb2, health_pb2_grpc
from model_files import write_hf_dir
from ray_cluster import LOOPBACK_ENV, listeners_beyond_loopback
from reference import random_params

from protos import generate_pb2 as pb
from protos import generate_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
ALIAS = "pdserve-ci"
pytestmark = pytest.mark.deploy


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")  # one login for both cases (ssh reuses its connection for a few seconds)
def sshd_and_alias(compiled_gqa, cache_dir):
    if os.geteuid() != 0 or shutil.which("sshd") is None or shutil.which("rsync") is None:
        pytest.fail("the deploy test needs root, sshd and rsync (see .ci/run)")
    if ":22 " in run(["ss", "-ltnH"]).stdout + " ":
        pytest.fail("port 22 is taken on this machine")
    base = Path(tempfile.mkdtemp(prefix="pdserve-deploy-"))
    home = base / "home"
    (home / ".ssh").mkdir(parents=True)
    key = base / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "host_key")], check=True)
    (home / ".ssh" / "authorized_keys").write_text((base / "id_ed25519.pub").read_text())
    venv_bin = Path(sys.executable).parent
    (home / ".bashrc").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    run(["useradd", "-o", "-u", "0", "-g", "0", "-M", "-d", str(home), "-s", "/bin/bash", ALIAS], check=True)
    run(["usermod", "-p", "*", ALIAS], check=True)  # no password, but not locked (sshd refuses locked accounts)
    cfg = base / "sshd_config"
    cfg.write_text(
        f"ListenAddress 127.0.0.1\nPort 22\nHostKey {base}/host_key\nPidFile {base}/sshd.pid\n"
        f"AuthorizedKeysFile {home}/.ssh/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"AllowUsers {ALIAS}\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert sshd.poll() is None, sshd.stderr.read()
    model = write_hf_dir(base / "model", TINY_GQA, random_params(TINY_GQA, seed=12))
    try:
        yield base, key, model, cache_dir
    finally:
        sshd.send_signal(signal.SIGTERM)
        sshd.wait(10)
        run(["userdel", "-f", ALIAS])
        shutil.rmtree(base, ignore_errors=True)


def _ours(new: set[int], before: set[int]) -> set[int]:
    """The new processes this test is responsible for: descendants of this process, or orphans (Ray daemonizes,
    so its processes hang off pid 1). Processes that other users of the machine start meanwhile hang off
    processes that existed before the test, and are left out."""
    me, mine = os.getpid(), set()
    for pid in new:
        try:
            proc = psutil.Process(pid)
            while proc is not None and proc.pid in new:
                proc = proc.parent()
        except psutil.NoSuchProcess:
            continue
        if proc is None or proc.pid in (me, 1):
            mine.add(pid)
    return mine


@pytest.mark.parametrize("decode_stages", [1, 2], ids=["one-process", "2-stage-decode"])
def test_ray_up_serves_and_ray_down_cleans_up(sshd_and_alias, decode_stages):
    """The second case runs the decode pool as 2 pipeline stages (stage actors on the node's decode_stage slots)."""
    base, key, model, cache_dir = sshd_and_alias
    resources = {"prefill": 1, "decode": 1} | ({"decode_stage": decode_stages} if decode_stages > 1 else {})
    grpc_port, ray_port = free_port(), free_port()
    tmpl = string.Template((REPO / "deploy" / "loopback.yaml").read_text())
    temp_dir = base / f"ray{decode_stages}"
    config = base / f"cluster{decode_stages}.yaml"
    config.write_text(
        tmpl.substitute(
            ssh_user=ALIAS,
            ssh_key=key,
            ray_port=ray_port,
            temp_dir=temp_dir,
            cache_dir=cache_dir,
            model=model,
            grpc_port=grpc_port,
            resources=json.dumps(resources),
            stage_flags=f"--decode-stages {decode_stages}",
        )
    )
    check = run([sys.executable, "-m", "pdserve", "deploy", "check", str(config)])
    assert check.returncode == 0, check.stderr
    env = {**os.environ, **LOOPBACK_ENV}
    ray_cli = str(Path(sys.executable).parent / "ray")
    before = {p.pid for p in psutil.process_iter()}
    started: set[int] = set()
    try:
        up = run([ray_cli, "up", "-y", "--no-config-cache", str(config)], env=env, timeout=300)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline, status = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(1)
        log = (temp_dir / "pdserve-serve.log").read_text() if (temp_dir / "pdserve-serve.log").exists() else ""
        assert status == health_pb2.HealthCheckResponse.SERVING, log[-3000:]
        req = pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[1, 2, 3]),
            sampling=pb.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
        )
        responses = list(pb_grpc.GenerationStub(channel).Generate(req, timeout=120))
        assert [len(r.token_ids) for r in responses] == [1, 1, 1, 1] and responses[-1].finish_reason == "length"
        status = pb_grpc.GenerationStub(channel).GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
        [decode] = [w for w in status.workers if w.role == "decode"]
        assert len(decode.stages) == (decode_stages if decode_stages > 1 else 0)
        channel.close()
        started = _ours({p.pid for p in psutil.process_iter()} - before, before)
        names = " ".join(_cmdline(p) for p in started)
        assert "gcs_server" in names and "raylet" in names, names  # the leak check below sees Ray's daemons
        assert listeners_beyond_loopback(started) == []
    finally:
        started |= _ours({p.pid for p in psutil.process_iter()} - before, before)
        down = run([ray_cli, "down", "-y", str(config)], env=env, timeout=300)
    assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
    deadline, left = time.monotonic() + 90, []  # `pdserve serve` exits ~10 s after its cluster is gone
    while time.monotonic() < deadline:
        left = [p for p in started if _running(p)]
        if not left:
            break
        time.sleep(1)
    assert not left, [" ".join(psutil.Process(p).cmdline()[:4]) for p in left if psutil.pid_exists(p)]
    assert f":{grpc_port} " not in run(["ss", "-ltnH"]).stdout + " "


def _cmdline(pid: int) -> str:
    """The first two words of a process's command line ("" once it is gone or a zombie)."""
    try:
        return " ".join(psutil.Process(pid).cmdline()[:2])
    except psutil.Error:
        return ""


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
