"""A pipelined worker's stages as Ray actors (#28): `--decode-stages S` (or `--prefill-stages`, `--stages`) makes
each worker of that pool a driver (this process: tokenizer, scheduler, sampling, the KV receiver or sender) plus S
`StageHost` actors, each compiled for its layer range, loading only its tensors and holding only its layers' KV.

Lifecycle:
  1. The worker (a Ray actor) calls `open_staged_model(options, role)`: one placement group of S bundles, each
     `{"<role>_stage": 1}` (+ a GPU on CUDA), `PACK` by default or `SPREAD` (`--stage-placement`); S `StageHost`
     actors in it, one per bundle; each opens its stage and serves it over gRPC (`engine.stages.StageServer`,
     the cluster token and internal TLS as every internal service; bound to the worker's KV host address).
  2. The driver's `StagedRuntime` chains them; the engines run on it unchanged.
  3. A stage's death is its worker's death: a watcher sees the actor die (or a call finds the stage gone) and
     the driver exits at once, without answering its requests, so the router migrates them as for a killed
     worker. The stages are owned by the driver and die with it (their pages with them); Ray restarts the
     driver, which removes the placement group its last incarnation left (groups live as long as the job),
     starts S new stages, and the router readmits it when `describe()` answers, i.e. when every stage is live.
  4. `StagedModel.close()` (worker shutdown) stops the watcher first, then kills the stages and removes the group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.messages import Role, StageInfo, StagePlacement, WorkerOptions
from engine.staged_runtime import StagedRuntime
from engine.stages import StageClient, StageServer
from llama_relax.compile import resolve_target
from llama_relax.loader import load_config, resolve_model
from llama_relax.models import load_tokenizer
from llama_relax.pipeline import open_stage
from llama_relax.runtime import KVCacheConfig
from llama_relax.stage_model import StageSpec
from llama_relax.tokenizer import Tokenizer

log = logging.getLogger(__name__)
STAGE_START_TIMEOUT_S = 1800.0  # a cold start compiles the stage's library (minutes on 2 cores)
LOST_EXIT_CODE = 71


def kv_config(options: WorkerOptions) -> KVCacheConfig:
    return KVCacheConfig(options.max_batch_size, options.max_total_seq_len, options.prefill_chunk_size)


class StageHost:
    """One stage in a process of its own (a Ray actor): its library, its tensors, its layers' KV, its server."""

    def __init__(self, options: WorkerOptions, index: int, count: int) -> None:
        self.runtime = open_stage(
            resolve_model(Path(options.model)),
            StageSpec(index, count),
            dtype=options.dtype,
            target=resolve_target(options.target),
            cache_dir=Path(options.cache_dir),
            kv=kv_config(options),
            quantization=options.quantization,
            kv_cache_dtype=options.kv_cache_dtype,
        )
        from engine.hosting import internal_host  # (hosting imports this module)

        host = internal_host(options)
        self.server = StageServer(self.runtime, host, options.cluster_token, options.internal_tls)
        self.address = self.server.start()
        self._done = threading.Event()

    def where(self) -> tuple[str, int, str]:
        """(gRPC address, pid, Ray node id)."""
        import ray

        return self.address, os.getpid(), ray.get_runtime_context().get_node_id()

    def wait_closed(self) -> None:
        """Returns when the stage is shut down; the driver's watcher holds one call open to learn of its death."""
        self._done.wait()

    def shutdown(self) -> None:
        self._done.set()
        self.server.stop()
        self.runtime.close()


@dataclass
class StagedModel:
    """What a pipelined worker holds in place of an `OpenModel`: tokenizer, the `StagedRuntime`, the actors."""

    tokenizer: Tokenizer | None
    runtime: StagedRuntime
    stages: tuple[StageInfo, ...]
    handles: list[Any]
    group: Any
    closing: threading.Event

    def close(self) -> None:
        import ray

        self.closing.set()
        self.runtime.close()
        for h in self.handles:
            with contextlib.suppress(Exception):  # already gone: killed below anyway
                ray.get(h.shutdown.remote(), timeout=10)
            ray.kill(h)
        ray.util.remove_placement_group(self.group)


def _exit_lost(error: BaseException) -> None:
    """A stage is gone: exit now, so the router sees this worker die and migrates its requests (no answers)."""
    log.critical("pipeline stage lost (%s); exiting so the worker restarts with new stages", error)
    logging.shutdown()
    os._exit(LOST_EXIT_CODE)


def open_staged_model(options: WorkerOptions, role: Role) -> StagedModel:
    """Start this worker's `options.stages` stage actors (see the module docstring) and chain them."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not ray.is_initialized():
        raise RuntimeError(f"{options.stages} pipeline stages need Ray: run the worker under `pdserve serve`")
    count = options.stages
    bundle = {role.stage_resource: 1.0, **({"GPU": 1.0} if options.target == "cuda" else {})}
    strategy = "SPREAD" if options.stage_placement is StagePlacement.SPREAD else "PACK"
    # a placement group lives as long as the job, not its creator: remove the one a dead incarnation left
    prefix = f"pdserve-stages-{ray.get_runtime_context().get_actor_id()}-"
    for pg_id, pg in ray.util.placement_group_table().items():
        if pg.get("name", "").startswith(prefix) and pg.get("state") != "REMOVED":
            ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
    name = prefix + uuid.uuid4().hex[:8]
    group = placement_group([dict(bundle) for _ in range(count)], strategy=strategy, name=name)
    ray.get(group.ready(), timeout=STAGE_START_TIMEOUT_S)
    actor = ray.remote(StageHost)
    handles = [
        actor.options(
            num_cpus=0,
            max_restarts=0,
            max_concurrency=4,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
            resources={role.stage_resource: 1.0},
            num_gpus=bundle.get("GPU", 0),
        ).remote(options, i, count)
        for i in range(count)
    ]
    where = ray.get([h.where.remote() for h in handles], timeout=STAGE_START_TIMEOUT_S)
    clients = [StageClient(addr, options.cluster_token, options.internal_tls) for addr, _, _ in where]
    source = resolve_model(Path(options.model))
    config = load_config(source)
    runtime = StagedRuntime(clients, config, kv_config(options), _exit_lost, Path(options.cache_dir))
    stages = tuple(
        StageInfo(i, info.state.first_layer, info.state.num_layers, addr, pid, node, info.kv_cache_bytes)
        for i, (info, (addr, pid, node)) in enumerate(zip(runtime.infos, where, strict=True))
    )
    closing = threading.Event()
    watches = [h.wait_closed.remote() for h in handles]

    def watch() -> None:
        ready, _ = ray.wait(watches, num_returns=1)
        try:
            ray.get(ready[0])
        except Exception as e:  # the actor died
            if not closing.is_set():
                _exit_lost(e)

    threading.Thread(target=watch, name="stage-watch", daemon=True).start()
    log.info("%s worker: %d stages ready: %s", role.value, count, [s.address for s in stages])
    return StagedModel(load_tokenizer(source), runtime, stages, handles, group, closing)
