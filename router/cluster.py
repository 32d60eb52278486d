"""Bringing up the worker pools on Ray: start (or join) the cluster on loopback, place the actors on the custom
resources `prefill` / `decode`, wait until they answer, and tear everything down again.

Every Ray process this starts runs with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray then keeps its node address on
loopback instead of rewriting 127.0.0.1 to the routable address) and an explicit RAY_AUTH_MODE."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from engine.messages import Role, WorkerOptions
from router.clients import RayDecodeClient, RayPrefillClient
from router.pools import Pools, WorkerSlot
from router.router import ServeMode

RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def loopback_ray_env() -> None:
    """Keep every Ray process this one starts on loopback (unless the caller set these explicitly). Call it at
    a process's entry point, before anything imports Ray: Ray reads them once, at import."""
    for k, v in RAY_LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)


@dataclass(frozen=True)
class ClusterSpec:
    """What to run: `colocated > 0` serves with that many colocated engines instead of the P/D pools."""

    prefill_workers: int = 1  # at start (a planned pool's MIN)
    decode_workers: int = 1
    prefill_max: int = 0  # the most the planner may run (0: the start size)
    decode_max: int = 0
    colocated: int = 0
    address: str | None = None  # None: start a local cluster on 127.0.0.1
    threads_per_worker: int = 0  # 0: the local cores divided among the processes that compute
    prefill_stages: int = 1  # pipeline stages per worker of each pool (engine.stage_actors)
    decode_stages: int = 1
    colocated_stages: int = 1
    switchable: bool = False  # P/D workers are `RoleWorker`s (the planner may switch their role)

    @property
    def mode(self) -> ServeMode:
        return ServeMode.COLOCATED if self.colocated else ServeMode.DISAGGREGATED

    @property
    def num_workers(self) -> int:
        return self.colocated or (self.prefill_workers + self.decode_workers)

    def stages(self, role: Role) -> int:
        return {Role.PREFILL: self.prefill_stages, Role.DECODE: self.decode_stages}.get(role, self.colocated_stages)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefill_max", max(self.prefill_max, self.prefill_workers))
        object.__setattr__(self, "decode_max", max(self.decode_max, self.decode_workers))

    def most(self, role: Role) -> int:
        """The most workers of `role` that may run at once (a local cluster offers that many slots)."""
        if self.colocated:
            return self.colocated if role is Role.COLOCATED else 0
        return {Role.PREFILL: self.prefill_max, Role.DECODE: self.decode_max}.get(role, 0)

    def workers(self, role: Role) -> int:
        if self.colocated:
            return self.colocated if role is Role.COLOCATED else 0
        return {Role.PREFILL: self.prefill_workers, Role.DECODE: self.decode_workers}.get(role, 0)

    @property
    def num_processes(self) -> int:
        """Processes that run the model: a worker itself, or each of its stages (its driver only schedules)."""
        return sum(self.workers(r) * self.stages(r) for r in Role)


def connect_ray(spec: ClusterSpec) -> Any:
    """Start a local loopback cluster (with the pools' custom resources) or join `spec.address`. The process's
    entry point must have called `loopback_ray_env()` before Ray was first imported."""
    import ray
    from ray._private import ray_constants

    if spec.address is None and ray_constants.ENABLE_RAY_CLUSTER:  # read when ray was first imported
        raise RuntimeError(
            "Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: a local cluster would bind beyond "
            "loopback"
        )
    threads = spec.threads_per_worker or max(1, len(os.sched_getaffinity(0)) // spec.num_processes)
    env = {"env_vars": {**{k: os.environ[k] for k in RAY_LOOPBACK_ENV}, "TVM_NUM_THREADS": str(threads)}}
    if spec.address is None:
        resources = {r.value: spec.most(r) for r in Role}
        resources |= {r.stage_resource: spec.most(r) * spec.stages(r) for r in Role if spec.stages(r) > 1}
        ray.init(
            num_cpus=max(2, spec.num_workers),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            resources=resources,
            log_to_driver=False,
            runtime_env=env,
        )
    else:
        ray.init(address=spec.address, log_to_driver=False, runtime_env=env)
    return ray


@dataclass
class Cluster:
    """The started actors (for their lifecycle) and the router's typed view of them."""

    handles: list[Any]
    pools: Pools


ACTOR = {"max_concurrency": 256, "num_cpus": 0, "max_restarts": -1, "max_task_retries": 0}


def start_worker(
    ray: Any, role: Role, spec: ClusterSpec, options: WorkerOptions, name: str, stall_timeout_s: float
) -> tuple[Any, WorkerSlot]:
    """Create one worker actor of `role` (on the custom resource named by its role; it loads its model in the
    background) and the router's slot for it. Ray restarts its process if it dies, without a cap. With
    `spec.switchable` (the planner is on) a prefill or decode worker is a `RoleWorker`."""
    from decode_worker.worker import ColocatedWorker, DecodeWorker
    from prefill_worker.worker import PrefillWorker
    from router.role_worker import RoleWorker

    cls = {Role.PREFILL: PrefillWorker, Role.DECODE: DecodeWorker, Role.COLOCATED: ColocatedWorker}[role]
    opts = dataclasses.replace(options, stages=spec.stages(role))
    gpu = 1 if options.target == "cuda" and opts.stages == 1 else 0  # a CUDA worker holds one GPU (or its stages)
    place = {"resources": {role.value: 1}, "num_gpus": gpu, **ACTOR}
    if spec.switchable and role is not Role.COLOCATED:
        handle = ray.remote(RoleWorker).options(**place).remote(opts, role)
    else:
        handle = ray.remote(cls).options(**place).remote(opts)
    return handle, worker_slot(ray, role, handle, name, stall_timeout_s)


def worker_slot(ray: Any, role: Role, handle: Any, name: str, stall_timeout_s: float) -> WorkerSlot:
    """The router's slot for a worker actor serving `role` (a role switch makes a new one on the same actor)."""
    client_cls = RayPrefillClient if role is Role.PREFILL else RayDecodeClient
    slot = WorkerSlot(name, role, None)
    slot.client = client_cls(ray, handle, name, stall_timeout_s, alive=lambda s=slot: s.alive)
    return slot


def start_pools(ray: Any, spec: ClusterSpec, options: WorkerOptions, stall_timeout_s: float = 30.0) -> Cluster:
    """Create the worker actors and wait until each has loaded its model; the pools are refreshed once, so every
    worker's KV address and load are known. The router's pool monitor readmits a restarted worker's new
    incarnation; a call slower than `stall_timeout_s` treats the worker as failed."""
    pools = Pools(kv_dtype="" if options.kv_cache_dtype == "auto" else options.kv_cache_dtype)
    if spec.colocated:
        roles = [Role.COLOCATED] * spec.colocated
    else:
        roles = [Role.PREFILL] * spec.prefill_workers + [Role.DECODE] * spec.decode_workers
    handles = []
    for i, role in enumerate(roles):
        handle, slot = start_worker(ray, role, spec, options, f"{role.value}-{i}", stall_timeout_s)
        pools.pool(role).append(slot)
        handles.append(handle)
    ray.get([h.ping.remote() for h in handles])
    pools.refresh()
    return Cluster(handles, pools)


def stop_pools(ray: Any, cluster: Cluster, timeout_s: float = 30.0) -> None:
    refs = [h.shutdown.remote() for h in cluster.handles]
    with contextlib.suppress(Exception):  # a dead or stuck worker is killed below anyway
        ray.get(refs, timeout=timeout_s)
    for h in cluster.handles:
        with contextlib.suppress(Exception):  # already gone
            ray.kill(h)
