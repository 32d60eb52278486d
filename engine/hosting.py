"""Hosting an engine in a worker process of its own (the router runs these as Ray actors; tests may too).

Lifecycle: `open_worker_model(options)` opens the compiled model -> the worker builds its engine and starts its
thread -> the router calls `describe()` once per process (`incarnation` tells a restarted process apart),
`load()` for placement, `cancel()` at any time -> `shutdown()` releases everything. The process's TVM thread count
is set by whoever starts the process (Ray's runtime env, the CLI's `main`), never here."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Protocol

from engine.loop import EngineLoop
from engine.messages import Role, WorkerInfo, WorkerLoad, WorkerOptions
from engine.stage_actors import StagedModel, open_staged_model
from kvtransfer.net import WILDCARD_HOSTS, is_loopback
from llama_relax.compile import resolve_target
from llama_relax.kv_dtype import kv_bytes_per_token
from llama_relax.models import OpenModel, open_model
from llama_relax.runtime import KVCacheConfig

log = logging.getLogger(__name__)
EXIT_GRACE_S = 0.5  # lets the failed requests' last items reach their callers


def open_worker_model(options: WorkerOptions, role: Role) -> OpenModel | StagedModel:
    """Open the worker's model: its compiled library from the cache, weights, a KV cache sized by `options`; with
    `options.stages > 1`, its pipeline stages as actors of their own (`engine.stage_actors`)."""
    if options.stages > 1:
        return open_staged_model(options, role)
    kv = KVCacheConfig(options.max_batch_size, options.max_total_seq_len, options.prefill_chunk_size)
    return open_model(
        Path(options.model),
        dtype=options.dtype,
        target=resolve_target(options.target),
        cache_dir=Path(options.cache_dir),
        kv=kv,
        quiet=True,
        quantization=options.quantization,
        kv_cache_dtype=options.kv_cache_dtype,
    )


def internal_host(options: WorkerOptions) -> str:
    """The address this process's internal services (KV receiver, pipeline stage) bind and advertise: a loopback
    `--host` as given (a one-machine cluster); otherwise this node's own address as Ray knows it, never a
    wildcard, so they are reached by the cluster's nodes and listen on no other interface."""
    if is_loopback(options.kv_host):
        return options.kv_host
    import ray

    if ray.is_initialized():
        return ray.util.get_node_ip_address()
    return socket.gethostbyname(socket.gethostname()) if options.kv_host in WILDCARD_HOSTS else options.kv_host


class HostableEngine(Protocol):
    """What a hosted engine offers besides its own calls."""

    error: BaseException | None

    def cancel(self, request_id: str) -> bool: ...

    def load(self, incarnation: str) -> WorkerLoad: ...

    def close(self) -> None: ...


class HostedEngine:
    """Base of the worker classes: describe, load, cancel, ping, shutdown. Subclasses set `role`, `model` and a
    started `engine`, and may override `kv_address()`."""

    role: Role
    model: OpenModel | StagedModel
    engine: HostableEngine

    def __init__(self) -> None:
        self.incarnation = uuid.uuid4().hex[:16]

    def _host(self, engine: EngineLoop) -> None:
        """Start the engine; if it ever breaks, this process exits (after its requests got their errors), so the
        supervisor (Ray) restarts it instead of leaving a live process that fails every call."""

        def exit_process(error: BaseException) -> None:
            log.critical(
                "%s engine is broken (%s: %s); exiting so it is restarted", self.role.value, type(error).__name__, error
            )
            threading.Timer(EXIT_GRACE_S, os._exit, args=(70,)).start()

        engine.on_fatal = exit_process
        engine.start()

    def kv_address(self) -> str:
        return ""

    def describe(self) -> WorkerInfo:
        rt = self.model.runtime
        per_token = kv_bytes_per_token(rt.config, rt.compiled.kv_dtype)
        total = rt.kv_cache_bytes
        stages = self.model.stages if isinstance(self.model, StagedModel) else ()
        return WorkerInfo(
            self.role, self.incarnation, os.getpid(), self.kv_address(), rt.compiled.kv_dtype, per_token, total, stages
        )

    def load(self) -> WorkerLoad:
        return self.engine.load(self.incarnation)

    def cancel(self, request_id: str) -> bool:
        return self.engine.cancel(request_id)

    def ping(self) -> None:
        if self.engine.error is not None:
            raise RuntimeError(f"{self.role.value} engine is broken: {self.engine.error}")

    def shutdown(self) -> None:
        self.engine.close()
        self.model.close()
