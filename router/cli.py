"""The router's `pdserve` subcommands: `serve` (cluster + gRPC API) and `generate --addr` (the API's client).
Registered through the `pdserve.commands` entry point; `generate` without `--addr` runs the model locally."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


# ---- serve ----------------------------------------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    from engine.messages import StagePlacement
    from engine.speculation import SpecMode
    from llama_relax.cli import add_model_args

    add_model_args(p)
    p.add_argument(
        "--prefill-workers", default="1", metavar="N|MIN:MAX", help="prefill pool size, or a range the planner sizes"
    )
    p.add_argument(
        "--decode-workers", default="1", metavar="N|MIN:MAX", help="decode pool size, or a range the planner sizes"
    )
    p.add_argument("--colocated", type=int, default=0, metavar="N", help="serve with N colocated engines instead")
    p.add_argument("--host", default="127.0.0.1", help="gRPC bind address (default loopback only)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus endpoint port (0: off)")
    p.add_argument(
        "--otlp-traces-endpoint",
        default=None,
        metavar="URL",
        help="export one OpenTelemetry trace per request over OTLP/HTTP to URL, e.g. http://127.0.0.1:4318/v1/traces "
        "(default: off)",
    )
    p.add_argument(
        "--http-port", type=int, default=8000, help="OpenAI-compatible HTTP API port, on --host (default 8000; 0: off)"
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require this key on both APIs (HTTP: Authorization: Bearer KEY; gRPC: metadata authorization); "
        "default $PDSERVE_API_KEY, else none",
    )
    p.add_argument(
        "--internal-tls-cert",
        type=Path,
        default=None,
        help="PEM certificate for the workers' internal gRPC services (KV pushes); its subjectAltName must carry "
        "DNS:pdserve-internal; with --internal-tls-key",
    )
    p.add_argument("--internal-tls-key", type=Path, default=None, help="PEM private key of --internal-tls-cert")
    p.add_argument("--max-total-seq-len", type=int, default=8192, help="KV capacity per worker, in tokens")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=0,
        help="sequences per worker (0: one per 256 tokens of KV capacity, 1..32)",
    )
    p.add_argument("--prefill-chunk-size", type=int, default=512)
    p.add_argument("--threads-per-worker", type=int, default=0, help="TVM threads per worker (0: cores / workers)")
    pl = p.add_argument_group("planner (on when a pool's size is a range)")
    pl.add_argument("--slo", default=None, metavar="ttft=MS,itl=MS", help="the targets the planner sizes pools to")
    pl.add_argument("--planner-interval-s", type=float, default=10.0, help="seconds between planner ticks (10)")
    pl.add_argument(
        "--planner-node-wait-s",
        type=float,
        default=120.0,
        help="seconds a new worker may wait for a node before a worker of the other pool switches role (120)",
    )
    pp = p.add_argument_group("pipeline stages (a model split across processes or nodes)")
    pp.add_argument("--prefill-stages", type=int, default=1, help="stage actors per prefill worker (default 1)")
    pp.add_argument("--decode-stages", type=int, default=1, help="stage actors per decode worker (default 1)")
    pp.add_argument("--stages", type=int, default=1, help="stage actors per --colocated worker (default 1)")
    pp.add_argument(
        "--stage-placement",
        choices=[m.value for m in StagePlacement],
        default=StagePlacement.PACK.value,
        help="a worker's stages: pack = as few nodes as fit (default), spread = one stage per node",
    )
    c = p.add_argument_group("prefix cache")
    c.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="no prefix caches, cache-aware routing or local prefill (the baseline)",
    )
    c.add_argument(
        "--local-prefill-max-tokens",
        type=int,
        default=64,
        help="the decode worker prefills an uncached prompt part this short itself (default 64; 0: never)",
    )
    k = p.add_argument_group("KV hand-off")
    k.add_argument(
        "--no-kv-stream",
        action="store_true",
        help="send a prompt's KV in one piece after its last prefill chunk (default: each chunk's KV is streamed "
        "while the next computes)",
    )
    k.add_argument(
        "--kv-stream-tail",
        type=int,
        default=64,
        help="a streamed prompt's last N tokens get a forward of their own, so only their KV is left to move "
        "after token 1 (default 64; 0: no split)",
    )
    sp = p.add_argument_group("speculative decoding")
    sp.add_argument(
        "--speculative",
        default="auto",
        choices=[m.value for m in SpecMode],
        help="auto (default): draft from the sequence's own text and the worker's recent outputs, verify in one "
        "forward per step, each draft sized by its expected gain against this machine's measured step cost (plain "
        "decoding when nothing pays); ngram: prompt lookup, whole drafts; suffix: ngram plus recent outputs; "
        "off: one token per step",
    )
    sp.add_argument("--num-speculative-tokens", type=int, default=8, help="the largest draft per step (default 8)")
    g = p.add_argument_group("failures and load")
    g.add_argument("--migration-limit", type=int, default=3, help="migrations per request (default 3)")
    g.add_argument(
        "--recovery-timeout",
        type=float,
        default=60.0,
        help="seconds a request waits for a decode worker to come back (default 60)",
    )
    g.add_argument(
        "--kv-lease-s",
        type=float,
        default=30.0,
        help="seconds before unacknowledged KV or a reservation without KV is freed (default 30)",
    )
    g.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="seconds a worker may take to answer before it is treated as failed (default 30)",
    )
    g.add_argument(
        "--max-queue-wait-s",
        type=float,
        default=30.0,
        help="seconds a request waits for room on the decode pool (default 30)",
    )
    g.add_argument("--max-queued-requests", type=int, default=256, help="requests that may wait (default 256)")
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGTERM/Ctrl-C (default 30)",
    )
    g.add_argument(
        "--inject-fault",
        action="append",
        default=[],
        metavar="STAGE:ACTION[:SECONDS][xTIMES]",
        help="fault drills: e.g. prefill_forward:pause:5, kv_send:corrupt (see engine/faults.py)",
    )
    g.add_argument("--fault-marker-dir", default="", help="fault drills: touch <dir>/<stage> when a fault fires")


def _run_serve(args: argparse.Namespace) -> int:
    from router.serve import run_serve

    return run_serve(args)


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
