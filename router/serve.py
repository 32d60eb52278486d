"""`pdserve serve`: compile once, start (or join) the Ray cluster on loopback, start the worker pools, the router,
the pool monitor and the gRPC front, then serve until SIGINT/SIGTERM and drain.

Lifecycle:
  1. validate the flags into `WorkerOptions` / `RouterOptions` (one-line errors), compile the model into the cache;
  2. start the pools (every worker answered `ping`), the monitor (readmits restarted workers), the server;
     print the address and `pdserve: ready`;
  3. on SIGINT/SIGTERM: health NOT_SERVING, new requests UNAVAILABLE, in-flight ones get `--drain-timeout` to
     finish; then the server, the workers and the local Ray cluster stop, and no process is left."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from kvtransfer.net import host_port, is_loopback
from router.cluster import ClusterSpec, connect_ray, loopback_ray_env, start_pools, stop_pools

MAX_AUTO_BATCH = 32
TOKENS_PER_SEQUENCE = 256
API_SPARE_CALLS = 16  # the auto batch size gives each sequence at least this much KV on average


def auto_batch_size(max_total_seq_len: int) -> int:
    """The default `--max-batch-size`: as many sequences as the KV capacity holds at 256 tokens each, 1..32."""
    return max(1, min(MAX_AUTO_BATCH, max_total_seq_len // TOKENS_PER_SEQUENCE))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_serve(args: argparse.Namespace) -> int:
    loopback_ray_env()  # before anything below imports Ray
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.faults import Fault, FaultPlan
    from engine.messages import WorkerOptions
    from llama_relax.compile import compile_model, resolve_target
    from llama_relax.errors import UserError
    from llama_relax.loader import load_config, quant_plan, resolve_model
    from llama_relax.models import default_model_path, load_tokenizer
    from router.convert import ModelLimits
    from router.http_api import OpenAIFront
    from router.metrics import Metrics
    from router.pools import PoolMonitor, pools_live
    from router.router import Router, RouterOptions
    from router.server import GenerationService, ServedModel, start_server

    if args.colocated and (args.prefill_workers != 1 or args.decode_workers != 1):
        raise ValueError("--colocated replaces --prefill-workers/--decode-workers; give one or the other")
    if args.max_batch_size < 0 or not args.stall_timeout > 0 or not args.drain_timeout >= 0:
        raise ValueError("--max-batch-size must be >= 0, --stall-timeout > 0 and --drain-timeout >= 0")
    spec = ClusterSpec(args.prefill_workers, args.decode_workers, args.colocated, args.address, args.threads_per_worker)
    if args.local_prefill_max_tokens < 0:
        raise UserError("--local-prefill-max-tokens must be >= 0")
    caching = not args.no_prefix_cache
    if args.kv_stream_tail < 0:
        raise UserError("--kv-stream-tail must be >= 0")
    if not 0 <= args.http_port < 65536:
        raise UserError(f"--http-port must be in [0, 65535], got {args.http_port}")
    api_key = args.api_key or os.environ.get("PDSERVE_API_KEY") or None
    if api_key is None and not is_loopback(args.host):
        _say(f"pdserve: WARNING: serving on {args.host} without an API key: anyone who reaches it can use it")
    router_options = RouterOptions(
        args.migration_limit,
        args.recovery_timeout,
        args.max_queue_wait_s,
        args.max_queued_requests,
        cache_aware=caching,
        local_prefill_max_tokens=args.local_prefill_max_tokens if caching else 0,
    )
    faults = FaultPlan(tuple(Fault.parse(f) for f in args.inject_fault), args.fault_marker_dir)
    model_path = args.model or default_model_path(args.cache_dir)
    src = resolve_model(model_path)
    config = load_config(src)
    tokenizer = load_tokenizer(src)
    options = WorkerOptions(
        model=str(Path(model_path).resolve()),
        cache_dir=str(Path(args.cache_dir).resolve()),
        dtype=args.dtype,
        target=args.target,
        quantization=args.quantization,
        max_batch_size=args.max_batch_size or auto_batch_size(args.max_total_seq_len),
        max_total_seq_len=args.max_total_seq_len,
        prefill_chunk_size=args.prefill_chunk_size,
        kv_host=args.host,
        kv_lease_s=args.kv_lease_s,
        prefix_cache=caching,
        kv_stream=not args.no_kv_stream,
        kv_stream_tail=args.kv_stream_tail,
        faults=faults,
    )
    target = resolve_target(args.target)
    plan = quant_plan(src, config, args.quantization, target.kind)
    compile_model(config, args.dtype, target, cache_dir=args.cache_dir, plan=plan)  # once: workers hit the cache
    _say(f"[pdserve] starting {spec.mode.value} workers on Ray ({spec.address or 'local cluster on 127.0.0.1'})...")
    if faults.faults:
        _say(f"[pdserve] fault drill: {', '.join(args.inject_fault)}")
    ray = connect_ray(spec)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs a SIGTERM handler of its own
        signal.signal(sig, lambda *_: stop.set())
    cluster = server = router = monitor = health = http = None
    try:
        cluster = start_pools(ray, spec, options, args.stall_timeout)
        pools = cluster.pools
        metrics = Metrics()
        router = Router(pools, spec.mode, router_options, metrics)
        monitor = PoolMonitor(pools).start()
        if args.metrics_port:
            metrics.serve(args.metrics_port, args.host)
        served = ServedModel(
            src.path.name, args.dtype, ModelLimits.of(config), config.num_hidden_layers, config.hidden_size, tokenizer
        )
        running = options.max_batch_size * (spec.colocated or spec.decode_workers)
        calls = running + router_options.max_queued + API_SPARE_CALLS  # the spare: health, status, refusals
        service = GenerationService(router, served, metrics)
        server, health, port = start_server(service, args.host, args.port, calls, api_key)
        if args.http_port:
            front = OpenAIFront(router, served, metrics, lambda: pools_live(pools), api_key)
            http = front.serve(args.host, args.http_port).start()
        workers = (
            f"{spec.colocated} colocated"
            if spec.colocated
            else f"{spec.prefill_workers} prefill + {spec.decode_workers} decode"
        )
        print(
            f"pdserve: serving {served.name} ({workers} workers, batch {options.max_batch_size}) on {args.host}:{port}",
            flush=True,
        )
        if http is not None:
            print(
                f"pdserve: OpenAI-compatible HTTP API on http://{host_port(args.host, args.http_port)}/v1", flush=True
            )
        print("pdserve: ready", flush=True)
        lost = 0
        while not stop.wait(1.0):
            lost = lost + 1 if not any(w.alive for w in pools.workers) else 0
            if spec.address is not None and lost >= 10:  # the joined cluster went away (e.g. `ray down`)
                _say("pdserve: lost every worker of the Ray cluster; exiting")
                break
            metrics.observe_pools(pools.workers)
            metrics.queued.set(router.admission.waiting)
    finally:
        if router is not None:
            if health is not None:
                health.enter_graceful_shutdown()
            _say(f"pdserve: draining (up to {args.drain_timeout:g} s for in-flight requests)")
            left = router.drain(args.drain_timeout)
            _say(f"pdserve: shutting down ({left} requests still running)" if left else "pdserve: shutting down")
        if http is not None:
            http.stop()
        if server is not None:
            server.stop(grace=2).wait(5)
        if monitor is not None:
            monitor.stop()
        if router is not None:
            router.close()
        if cluster is not None:
            stop_pools(ray, cluster)
        ray.shutdown()
    return 0
