"""`python -m bench.stage_handoff`: what one hop between pipeline stages costs, Ray object transfer vs gRPC (#28).

Two Ray actors on one node (loopback). Stage A hands stage B the hidden states of one forward, `[tokens, hidden]`
float32, and waits for B's acknowledgement, as a pipeline hop does (B would then run its layers):
- `ray`: `B.take.remote(array)` from inside A (Ray serializes the array; small ones travel inline, big ones
  through the node's object store), `ray.get` on the reply;
- `grpc`: a unary call from A to B's gRPC server with the array's bytes and its shape (a typed message), carrying
  the cluster token as metadata, as the internal services do.
Sizes: decode at batch 1 and 16 (one token each) and a prefill chunk of 512 tokens, SmolLM2's hidden 576. The two
transports alternate per round; the median per hop is reported.

    python -m bench.stage_handoff [--hidden 576] [--rounds 5] [--hops 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent import futures

import numpy as np

SIZES = {"decode b=1": 1, "decode b=16": 16, "prefill 512": 512}


class Stage:
    """A stage actor: takes hidden states (Ray call or gRPC), answers an ack; times hops to a peer."""

    def __init__(self, token: str) -> None:
        import grpc

        from kvtransfer.auth import TokenInterceptor

        self.token = token
        self.server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[TokenInterceptor(token)])
        handler = grpc.unary_unary_rpc_method_handler(
            self._take_grpc, request_deserializer=None, response_serializer=None
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("pdserve.bench.Stage", {"Take": handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.peer = None
        self.stub = None

    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def take(self, hidden: np.ndarray) -> int:
        return int(hidden.shape[0])

    def _take_grpc(self, request: bytes, _context) -> bytes:
        rows = int.from_bytes(request[:4], "little")
        hidden = np.frombuffer(request, dtype=np.float32, offset=8).reshape(rows, -1)
        return int(hidden.shape[0]).to_bytes(4, "little")

    def connect(self, peer, address: str) -> None:
        import grpc

        self.peer = peer
        channel = grpc.insecure_channel(address)
        self.stub = channel.unary_unary(
            "/pdserve.bench.Stage/Take", request_serializer=None, response_deserializer=None
        )

    def hops(self, transport: str, rows: int, hidden: int, n: int) -> list[float]:
        """`n` hops of `rows` x `hidden` float32 to the peer; seconds each."""
        import ray

        from kvtransfer.auth import token_metadata

        x = np.random.default_rng(0).standard_normal((rows, hidden), dtype=np.float32)
        meta = token_metadata(self.token)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            if transport == "ray":
                ray.get(self.peer.take.remote(x))
            else:
                head = rows.to_bytes(4, "little") + hidden.to_bytes(4, "little")
                self.stub(head + x.tobytes(), metadata=meta, timeout=30)
            out.append(time.perf_counter() - t0)
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stage_handoff", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hops", type=int, default=200)
    args = p.parse_args(argv)
    os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"})
    import ray

    from kvtransfer.auth import new_cluster_token
    from llama_relax.bench_model import cpu_description

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        token = new_cluster_token()
        actor = ray.remote(Stage).options(num_cpus=0)
        a, b = actor.remote(token), actor.remote(token)
        ray.get(a.connect.remote(b, ray.get(b.address.remote())))
        print(f"CPU: {cpu_description()}; hidden {args.hidden}, float32; median of {args.rounds} rounds", flush=True)
        result: dict[str, dict[str, list[float]]] = {}
        for label, rows in SIZES.items():
            for r in range(args.rounds):
                for t in ("ray", "grpc") if r % 2 == 0 else ("grpc", "ray"):
                    times = ray.get(a.hops.remote(t, rows, args.hidden, args.hops))
                    result.setdefault(label, {}).setdefault(t, []).append(statistics.median(times))
            nbytes = rows * args.hidden * 4
            med = {t: statistics.median(v) for t, v in result[label].items()}
            print(
                f"{label:12s} {nbytes / 1024:8.1f} KiB/hop: ray {med['ray'] * 1e6:8.0f} us, grpc "
                f"{med['grpc'] * 1e6:8.0f} us (ray / grpc = {med['ray'] / med['grpc']:.2f})",
                flush=True,
            )
        print(json.dumps({k: {t: statistics.median(v) for t, v in d.items()} for k, d in result.items()}))
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
