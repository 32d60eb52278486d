"""A throwaway local Ray cluster bound to loopback, for tests.

Ray is told to stay on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes it use the loopback address as the
node address; auth mode set explicitly); `listeners_beyond_loopback()` lets tests check that with `ss`."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@contextlib.contextmanager
def local_ray(resources: dict[str, float] | None = None) -> Iterator[object]:
    os.environ.update(LOOPBACK_ENV)
    import ray

    ray.init(
        num_cpus=4,
        resources=resources or {},
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {**LOOPBACK_ENV, "TVM_NUM_THREADS": "1"}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


_LOOPBACK = re.compile(r"^(127\.[0-9.]+|\[::1\]|::1|\[::ffff:127\.[0-9.]+\]):\d+$")


def listeners_beyond_loopback(pids: set[int] | None = None) -> list[str]:
    """`ss` lines of TCP listeners owned by Ray/python processes (or `pids`) not bound to loopback."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    bad = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4 or "users:" not in line:
            continue
        owner_pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        ours = re.search(r'"(python[\d.]*|ray::[^"]*|raylet|gcs_server|pdserve)"', line)
        mine = (pids is not None and owner_pids & pids) or (pids is None and ours)
        if mine and not _LOOPBACK.match(fields[3]):
            bad.append(line)
    return bad
