"""Bringing up the worker pools on Ray: start (or join) the cluster on loopback, place the actors on the custom
resources `prefill` / `decode`, wait until they answer, and tear everything down again.

Every Ray process this starts runs with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray then keeps its node address on
loopback instead of rewriting 127.0.0.1 to the routable address) and an explicit RAY_AUTH_MODE."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from prefill_worker.messages import WorkerOptions
from router.pools import Pools, WorkerState

RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@dataclass(frozen=True)
class ClusterSpec:
    """What to run: `colocated > 0` serves with that many colocated engines instead of the P/D pools."""

    prefill_workers: int = 1
    decode_workers: int = 1
    colocated: int = 0
    address: str | None = None  # None: start a local cluster on 127.0.0.1
    threads_per_worker: int = 0  # 0: the local cores divided among the workers

    def __post_init__(self) -> None:
        if self.colocated < 0 or self.prefill_workers < 0 or self.decode_workers < 0:
            raise ValueError("worker counts must be >= 0")
        if self.colocated == 0 and (self.prefill_workers < 1 or self.decode_workers < 1):
            raise ValueError("need at least one prefill and one decode worker (or --colocated N)")

    @property
    def mode(self) -> str:
        return "colocated" if self.colocated else "disaggregated"

    @property
    def num_workers(self) -> int:
        return self.colocated or (self.prefill_workers + self.decode_workers)


def connect_ray(spec: ClusterSpec) -> Any:
    """Start a local loopback cluster (with the pools' custom resources) or join `spec.address`."""
    for k, v in RAY_LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)
    import ray
    from ray._private import ray_constants

    if spec.address is None and ray_constants.ENABLE_RAY_CLUSTER:  # read when ray was first imported
        raise RuntimeError("Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: a local cluster "
                           "would bind beyond loopback")  # fmt: skip

    threads = spec.threads_per_worker or max(1, len(os.sched_getaffinity(0)) // spec.num_workers)
    env = {"env_vars": {**{k: os.environ[k] for k in RAY_LOOPBACK_ENV}, "TVM_NUM_THREADS": str(threads)}}
    if spec.address is None:
        ray.init(
            num_cpus=max(2, spec.num_workers), include_dashboard=False, _node_ip_address="127.0.0.1",
            resources={"prefill": spec.prefill_workers, "decode": spec.decode_workers, "colocated": spec.colocated},
            log_to_driver=False, runtime_env=env,
        )  # fmt: skip
    else:
        ray.init(address=spec.address, log_to_driver=False, runtime_env=env)
    return ray


def start_pools(ray: Any, spec: ClusterSpec, options: WorkerOptions) -> Pools:
    """Create the worker actors and wait until each has loaded its model."""
    from decode_worker.worker import ColocatedWorker, DecodeWorker
    from prefill_worker.worker import PrefillWorker

    actor = {"max_concurrency": 256, "num_cpus": 0, "max_restarts": 1}
    pools = Pools()
    plan: list[tuple[str, type, str]] = []
    if spec.colocated:
        plan += [("colocated", ColocatedWorker, "colocated")] * spec.colocated
    else:
        plan += [("prefill", PrefillWorker, "prefill")] * spec.prefill_workers
        plan += [("decode", DecodeWorker, "decode")] * spec.decode_workers
    gpus = 1 if options.target == "cuda" else 0  # a CUDA worker holds one GPU of its node
    for i, (role, cls, resource) in enumerate(plan):
        handle = ray.remote(cls).options(resources={resource: 1}, num_gpus=gpus, **actor).remote(options)
        pools.workers.append(WorkerState(f"{role}-{i}", role, handle))
    ray.get([w.handle.ping.remote() for w in pools.workers])
    pools.refresh(ray)
    return pools


def stop_pools(ray: Any, pools: Pools, timeout_s: float = 30.0) -> None:
    refs = [w.handle.shutdown.remote() for w in pools.workers]
    with contextlib.suppress(Exception):  # a dead or stuck worker is killed below anyway
        ray.get(refs, timeout=timeout_s)
    for w in pools.workers:
        with contextlib.suppress(Exception):  # already gone
            ray.kill(w.handle)
