"""The router's `pdserve` subcommands: `serve` (cluster + gRPC API) and `generate --addr` (the API's client).
Registered through the `pdserve.commands` entry point; `generate` without `--addr` runs the model locally."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path


# ---- serve ----------------------------------------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    from llama_relax.cli import add_model_args

    add_model_args(p)
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--colocated", type=int, default=0, metavar="N", help="serve with N colocated engines instead")
    p.add_argument("--host", default="127.0.0.1", help="gRPC bind address (default loopback only)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus endpoint port (0: off)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-total-seq-len", type=int, default=8192, help="KV capacity per worker, in tokens")
    p.add_argument("--prefill-chunk-size", type=int, default=512)
    p.add_argument("--threads-per-worker", type=int, default=0, help="TVM threads per worker (0: cores / workers)")


def _run_serve(args: argparse.Namespace) -> int:
    from router.cluster import ClusterSpec, connect_ray, loopback_ray_env, start_pools, stop_pools

    loopback_ray_env()  # before anything below imports Ray
    from engine.messages import WorkerOptions
    from llama_relax.compile import compile_model, resolve_target
    from llama_relax.loader import load_config, resolve_model
    from llama_relax.models import default_model_path, load_tokenizer
    from router.convert import ModelLimits
    from router.metrics import Metrics
    from router.router import Router
    from router.server import GenerationService, ServedModel, start_server

    if args.colocated and (args.prefill_workers != 1 or args.decode_workers != 1):
        raise ValueError("--colocated replaces --prefill-workers/--decode-workers; give one or the other")
    spec = ClusterSpec(args.prefill_workers, args.decode_workers, args.colocated, args.address, args.threads_per_worker)
    cache_dir = args.cache_dir
    model_path = args.model or default_model_path(cache_dir)
    src = resolve_model(model_path)
    config = load_config(src)
    tokenizer = load_tokenizer(src)
    compile_model(config, args.dtype, resolve_target(args.target), cache_dir=cache_dir)  # once: workers hit the cache
    options = WorkerOptions(
        model=str(Path(model_path).resolve()),
        cache_dir=str(Path(cache_dir).resolve()),
        dtype=args.dtype,
        target=args.target,
        max_batch_size=args.max_batch_size,
        max_total_seq_len=args.max_total_seq_len,
        prefill_chunk_size=args.prefill_chunk_size,
        kv_host=args.host,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"[pdserve] starting {spec.mode.value} workers on Ray ({spec.address or 'local cluster on 127.0.0.1'})...",
        file=sys.stderr,
        flush=True,
    )
    ray = connect_ray(spec)
    cluster = server = router = None
    try:
        cluster = start_pools(ray, spec, options)
        pools = cluster.pools
        router = Router(pools, spec.mode)
        metrics = Metrics()
        if args.metrics_port:
            metrics.serve(args.metrics_port, args.host)
        served = ServedModel(
            src.path.name, args.dtype, ModelLimits.of(config), config.num_hidden_layers, config.hidden_size, tokenizer
        )
        server, health, port = start_server(GenerationService(router, served, metrics), args.host, args.port)
        workers = (
            f"{spec.colocated} colocated"
            if spec.colocated
            else f"{spec.prefill_workers} prefill + {spec.decode_workers} decode"
        )
        print(f"pdserve: serving {served.name} ({workers} workers) on {args.host}:{port}", flush=True)
        print("pdserve: ready", flush=True)
        lost = 0
        while not stop.wait(1.0):
            pools.refresh()
            lost = lost + 1 if not any(w.alive for w in pools.workers) else 0
            if spec.address is not None and lost >= 10:  # the joined cluster went away (e.g. `ray down`)
                print("pdserve: lost every worker of the Ray cluster; exiting", file=sys.stderr, flush=True)
                break
            for w in pools.workers:
                metrics.kv_free.labels(w.name, w.role.value).set(w.load.free_pages)
                metrics.kv_total.labels(w.name, w.role.value).set(w.load.total_pages)
        print("pdserve: shutting down", file=sys.stderr, flush=True)
        health.enter_graceful_shutdown()
    finally:
        if server is not None:
            server.stop(grace=5).wait(10)
        if router is not None:
            router.close()
        if cluster is not None:
            stop_pools(ray, cluster)
        ray.shutdown()
    return 0


# ---- generate (local or remote) -------------------------------------------------------------------------------
def _generate_args(p: argparse.ArgumentParser) -> None:
    from llama_relax.cli import _generate_args as local_args

    local_args(p)
    p.add_argument("--addr", default=None, help="HOST:PORT of a `pdserve serve` (default: run the model locally)")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline for a remote request, seconds")


def _run_generate(args: argparse.Namespace) -> int:
    if args.addr is None:
        from llama_relax.cli import _run_generate as run_local

        return run_local(args)
    import grpc

    from kvtransfer.net import message_limits
    from llama_relax.errors import UserError
    from protos import generate_pb2 as pb
    from protos import generate_pb2_grpc as pb_grpc

    s = pb.SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )
    if args.seed is not None:
        s.seed = args.seed
    req = pb.GenerateRequest(sampling=s, chat=args.chat)
    if args.prompt is not None:
        req.text = args.prompt
    else:
        req.token_ids.ids.extend(args.prompt_ids)
    prompt_ids, ids, text, logprobs, finish = [], [], [], [], ""
    with grpc.insecure_channel(args.addr, options=message_limits()) as channel:
        try:
            for resp in pb_grpc.GenerationStub(channel).Generate(req, timeout=args.timeout):
                prompt_ids.extend(resp.prompt_token_ids)
                ids.extend(resp.token_ids)
                text.append(resp.text)
                logprobs.extend(
                    [[{"token_id": e.token_id, "logprob": e.logprob} for e in lp.entries] for lp in resp.logprobs]
                )
                finish = resp.finish_reason or finish
                if not args.json:
                    sys.stdout.write(resp.text)
                    sys.stdout.flush()
        except grpc.RpcError as e:
            raise UserError(f"{e.code().name}: {e.details()}") from None
    if args.json:
        print(
            json.dumps(
                {
                    "prompt_token_ids": prompt_ids,
                    "token_ids": ids,
                    "text": "".join(text),
                    "finish_reason": finish,
                    "logprobs": logprobs if args.logprobs else None,
                }
            )
        )
    else:
        sys.stdout.write("\n")
    return 0


def commands() -> list:
    return [
        ("serve", "serve the gRPC generate API from a Ray cluster of prefill/decode workers", _serve_args, _run_serve),
        ("generate", "generate text locally, or from a server with --addr", _generate_args, _run_generate),
    ]
