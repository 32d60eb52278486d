"""`pdserve serve`: compile once, start (or join) the Ray cluster on loopback, start the worker pools, the router,
the pool monitor and the fronts (gRPC, OpenAI HTTP), then serve until SIGINT/SIGTERM and drain.

Lifecycle:
  1. `ServeConfig.from_args` checks every flag (one line naming it); the model is compiled into the cache once
     (the workers hit the cache);
  2. `Serving.start`: the pools (every worker answered `ping`), metrics, tracer, router, the monitor (readmits
     restarted workers), the fronts; then `pdserve: ready`;
  3. on SIGINT/SIGTERM, `Serving.stop`: health NOT_SERVING, new requests UNAVAILABLE, in-flight ones get
     `--drain-timeout` to finish; then the fronts, the workers and the local Ray cluster stop (reverse order),
     and no process is left."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from kvtransfer.net import host_port
from router.cluster import connect_ray, loopback_ray_env

if TYPE_CHECKING:  # imported inside the functions: Ray must see loopback_ray_env() first
    from router.config import ServeConfig
    from router.server import ServedModel

log = logging.getLogger(__name__)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_serve(args: argparse.Namespace) -> int:
    loopback_ray_env()  # before anything below imports Ray
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from llama_relax.models import default_model_path
    from router.config import ServeConfig

    config = ServeConfig.from_args(args, lambda: default_model_path(args.cache_dir))
    if config.open_api:
        _say(f"pdserve: WARNING: serving on {config.host} without an API key: anyone who reaches it can use it")
    model = prepare_model(config)
    spec = config.cluster
    _say(f"[pdserve] starting {spec.mode.value} workers on Ray ({spec.address or 'local cluster on 127.0.0.1'})...")
    if config.faults.faults:
        _say(f"[pdserve] fault drill: {', '.join(f'{f.stage.value}:{f.action.value}' for f in config.faults.faults)}")
    ray = connect_ray(spec)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs a SIGTERM handler of its own
        signal.signal(sig, lambda *_: stop.set())
    serving = Serving(config, model)
    try:
        serving.start(ray)
        serving.run_until(stop)
    finally:
        serving.stop()
        ray.shutdown()
    return 0


def prepare_model(config: ServeConfig) -> ServedModel:
    """Compile the model into the cache (once: every worker then hits it; each stage's library for pipelined
    pools) and describe what is served."""
    from llama_relax.compile import compile_model, resolve_target
    from llama_relax.loader import load_config, quant_plan, resolve_model
    from llama_relax.models import load_tokenizer
    from router.convert import ModelLimits
    from router.server import ServedModel

    src = resolve_model(config.model)
    mc = load_config(src)
    target = resolve_target(config.target)
    plan = quant_plan(src, mc, config.quantization, target.kind)
    from engine.messages import Role
    from llama_relax.stage_model import StageSpec

    counts = sorted({config.cluster.stages(r) for r in Role if config.cluster.workers(r)})
    stages = [None if n == 1 else StageSpec(i, n) for n in counts for i in range(n)]  # every library the pools open
    for stage in stages:
        compile_model(
            mc, config.dtype, target, cache_dir=config.cache_dir, plan=plan, kv_dtype=config.kv_cache_dtype, stage=stage
        )
    limits = ModelLimits.of(mc)
    return ServedModel(src.path.name, config.dtype, limits, mc.num_hidden_layers, mc.hidden_size, load_tokenizer(src))


def start_planner(ray: Any, c: ServeConfig, cluster: Any, monitor: Any, metrics: Any) -> Any:
    """The planner (`router.planner`) and its hands (`router.scaling`), ticking every `--planner-interval-s`."""
    from router.planner import Planner
    from router.scaling import PlannerLoop, Scaler

    spec = c.planner
    planner = Planner(spec.ranges, spec.slo)
    scaler = Scaler(
        ray,
        c.cluster,
        c.worker_options(),
        cluster,
        monitor,
        drain_timeout_s=c.drain_timeout_s,
        stall_timeout_s=c.stall_timeout_s,
        stuck_after_s=spec.node_wait_s,
    )
    ranges = ", ".join(f"{role.value} {r.min}:{r.max}" for role, r in spec.ranges.items())
    _say(f"pdserve: planner on ({ranges}; TTFT {spec.slo.ttft_s * 1e3:g} ms, ITL {spec.slo.itl_s * 1e3:g} ms)")
    return PlannerLoop(planner, scaler, metrics, c.max_batch_size, spec.interval_s).start()


class Serving:
    """The running parts of one `pdserve serve`: `start` brings them up in order, `stop` (always called, also
    after a failed start) drains and takes down whatever started, in reverse order."""

    def __init__(self, config: ServeConfig, model: ServedModel) -> None:
        self.config, self.model = config, model
        self.ray: Any = None
        self.cluster = self.router = self.monitor = self.server = self.health = self.http = None
        self.planner: Any = None
        self.metrics: Any = None

    def start(self, ray: Any) -> None:
        from router.cluster import start_pools
        from router.http_api import OpenAIFront
        from router.metrics import Metrics
        from router.pools import PoolMonitor, pools_live
        from router.router import Router
        from router.server import GenerationService, start_server
        from router.tracing import Tracer

        c, self.ray = self.config, ray
        self.cluster = start_pools(ray, c.cluster, c.worker_options(), c.stall_timeout_s)
        pools = self.cluster.pools
        self.metrics = Metrics()
        self.router = Router(pools, c.cluster.mode, c.router, self.metrics, Tracer(c.otlp_traces_endpoint))
        self.monitor = PoolMonitor(pools).start()
        if c.planner is not None:
            self.planner = start_planner(ray, c, self.cluster, self.monitor, self.metrics)
        if c.metrics_port:
            self.metrics.serve(c.metrics_port, c.host)
        service = GenerationService(self.router, self.model, self.metrics)
        self.server, self.health, port = start_server(service, c.host, c.port, c.grpc_calls, c.api_key)
        if c.http_port:
            front = OpenAIFront(self.router, self.model, self.metrics, lambda: pools_live(pools), c.api_key)
            self.http = front.serve(c.host, c.http_port).start()
        s = c.cluster
        workers = (
            f"{s.colocated} colocated" if s.colocated else f"{s.prefill_workers} prefill + {s.decode_workers} decode"
        )
        print(f"pdserve: serving {self.model.name} ({workers} workers, batch {c.max_batch_size}) on {c.host}:{port}")
        if self.http is not None:
            print(f"pdserve: OpenAI-compatible HTTP API on http://{host_port(c.host, c.http_port)}/v1")
        print("pdserve: ready", flush=True)

    def run_until(self, stop: threading.Event) -> None:
        """Refresh the pool gauges every second until `stop`, or until a joined cluster lost every worker."""
        pools, lost = self.cluster.pools, 0
        while not stop.wait(1.0):
            lost = lost + 1 if not any(w.alive for w in pools.workers) else 0
            if self.config.cluster.address is not None and lost >= 10:  # the joined cluster went away (`ray down`)
                _say("pdserve: lost every worker of the Ray cluster; exiting")
                return
            self.metrics.observe_pools(pools.workers)
            self.metrics.queued.set(self.router.admission.waiting)

    def stop(self) -> None:
        from router.cluster import stop_pools

        if self.router is not None:
            if self.health is not None:
                self.health.enter_graceful_shutdown()
            _say(f"pdserve: draining (up to {self.config.drain_timeout_s:g} s for in-flight requests)")
            left = self.router.drain(self.config.drain_timeout_s)
            _say(f"pdserve: shutting down ({left} requests still running)" if left else "pdserve: shutting down")
        if self.planner is not None:
            self.planner.stop()
        if self.http is not None:
            self.http.stop()
        if self.server is not None:
            self.server.stop(grace=2).wait(5)
        if self.monitor is not None:
            self.monitor.stop()
        if self.router is not None:
            self.router.close()
            self.router.tracer.shutdown()
        if self.cluster is not None:
            stop_pools(self.ray, self.cluster)
