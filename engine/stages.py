"""Pipeline stages over gRPC (#28): a stage worker serves one stage's `ModelRuntime` (`protos/stage.proto`), a
driver chains them (`RemotePipeline`, the same prefill packing and decode step as the in-process `LocalPipeline`).

The hand-off is the hidden states of a forward's tokens, `[tokens, hidden]`, as a typed message over gRPC: measured
1.7-2.7x faster per hop than a Ray actor call here (BENCHMARK.md, `bench.stage_handoff`), and the channel carries
the cluster token and TLS like every internal service (`kvtransfer.auth`).

Lifecycle: `StageServer(runtime, host, token, tls).start()` -> the driver's `StageClient`s -> `Sequences` (add)
-> `Forward` on every stage in order, per step -> `Sequences` (remove) -> `stop()`. Runtime calls run on one
thread at a time (the KV cache has no locking). `python -m engine.stages --model PATH --stage I/N` serves one stage
in a process of its own (token from `$PDSERVE_CLUSTER_TOKEN`); it prints `stage ready on HOST:PORT`.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Sequence
from concurrent import futures

import grpc
import numpy as np
import tvm

from kvtransfer.auth import InternalTLS, TokenInterceptor, internal_channel, token_metadata
from kvtransfer.grpc_transport import GrpcKVReceiver, GrpcKVSender
from kvtransfer.payload import PayloadError
from kvtransfer.route import KVParts, KVRoute, push_parts
from kvtransfer.runtime_io import receiver_checks
from llama_relax.pipeline import StageChain
from llama_relax.runtime import ModelRuntime
from protos import stage_pb2 as pb

_SERVICE = "pdserve.stage.v1.Stage"
MAX_MESSAGE_BYTES = 256 << 20
PARTS_TTL_S = 120.0  # a part nobody commits (its sender failed, the request ended) is dropped after this


def to_array(a: np.ndarray) -> pb.Array:
    a = np.ascontiguousarray(a)
    return pb.Array(shape=list(a.shape), dtype=str(a.dtype), data=a.tobytes())


def from_array(m: pb.Array, field: str) -> np.ndarray:
    """The array a message carries; ValueError naming `field` when its bytes do not match its shape and dtype."""
    if m.dtype not in ("float32", "float16", "int32", "int8"):
        raise ValueError(f"{field}.dtype: {m.dtype!r} is not float32, float16, int32 or int8")
    shape = tuple(int(d) for d in m.shape)
    if any(d < 0 for d in shape) or int(np.prod(shape)) * np.dtype(m.dtype).itemsize != len(m.data):
        raise ValueError(f"{field}: {len(m.data)} bytes do not hold {m.dtype}{list(shape)}")
    return np.frombuffer(m.data, dtype=m.dtype).reshape(shape)


class StageServer:
    """Serves one stage's runtime; see the module docstring."""

    def __init__(
        self, runtime: ModelRuntime, host: str = "127.0.0.1", token: str = "", tls: InternalTLS | None = None
    ) -> None:
        if runtime.compiled.stage is None:
            raise ValueError("StageServer needs a pipeline stage's library (compile_model(stage=...))")
        self.runtime = runtime
        self.host, self.token, self.tls = host, token, tls
        self.index, self.count = runtime.compiled.stage
        self.layers = runtime.config.layer_ranges(self.count)[self.index]
        self.embeds = runtime.config.embedding_stage(self.count) == self.index
        self._lock = threading.Lock()  # one forward (or sequence change) at a time
        # lookups beside the forwards (another group's next input while this stage runs a group), one at a time
        self._lookup = runtime.side_embedder() if self.embeds else None
        self._lookup_lock = threading.Lock()
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", -1)]
        self._server = grpc.server(
            futures.ThreadPoolExecutor(8, thread_name_prefix="stage"),
            options=opts,
            interceptors=[TokenInterceptor(token)] if token else None,
        )
        self._kept = None  # the last stage's states of the last forward with keep_hidden (for Logits)
        # KV stage to stage: a decode stage's receiver and the parts it holds; a prefill stage's sender
        self._kv_lock = threading.Lock()
        self._kv_rx: GrpcKVReceiver | None = None
        self._kv_fingerprint = ""
        self.parts = KVParts(self.layers, max(runtime.kv_cache_bytes, 64 << 20), PARTS_TTL_S)
        self._kv_tx: GrpcKVSender | None = None
        self._kv_pool = futures.ThreadPoolExecutor(4, thread_name_prefix="stage-kv")
        methods = {
            "Describe": (self._describe, pb.SequencesRequest, pb.StageInfo),
            "Sequences": (self._sequences, pb.SequencesRequest, pb.StageState),
            "Forward": (self._forward, pb.ForwardRequest, pb.ForwardReply),
            "Embed": (self._embed, pb.ForwardRequest, pb.ForwardReply),
            "Logits": (self._logits, pb.LogitsRequest, pb.ForwardReply),
            "ReadKV": (self._read_kv, pb.ReadKVRequest, pb.KVBlock),
            "AppendKV": (self._append_kv, pb.AppendKVRequest, pb.StageState),
            "OpenKV": (self._open_kv, pb.OpenKVRequest, pb.OpenKVReply),
            "PushKV": (self._push_kv, pb.PushKVRequest, pb.PushKVReply),
            "CommitKV": (self._commit_kv, pb.CommitKVRequest, pb.StageState),
            "DropKV": (self._drop_kv, pb.DropKVRequest, pb.StageState),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(fn, req.FromString, rep.SerializeToString)
            for name, (fn, req, rep) in methods.items()
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
        bind = f"{host}:0"
        port = (
            self._server.add_secure_port(bind, tls.server_credentials())
            if tls
            else self._server.add_insecure_port(bind)
        )
        self.address = f"{host}:{port}"

    def start(self) -> str:
        self._server.start()
        return self.address

    def stop(self) -> None:
        self._server.stop(None).wait()
        with self._kv_lock:
            if self._kv_rx is not None:
                self._kv_rx.stop(0)
            if self._kv_tx is not None:
                self._kv_tx.close()
        self._kv_pool.shutdown(wait=False, cancel_futures=True)

    def _state(self) -> pb.StageState:
        rt = self.runtime
        layers = rt.config.layer_ranges(self.count)[self.index]
        return pb.StageState(
            index=self.index,
            count=self.count,
            first_layer=layers.start,
            num_layers=len(layers),
            free_pages=rt.free_pages(),
            sequences=len(rt.sequence_ids()),
            embeds=self.embeds,
            kv_parts=len(self.parts),
        )

    def _describe(self, req: pb.SequencesRequest, context: grpc.ServicerContext) -> pb.StageInfo:
        rt = self.runtime
        with self._lock:
            return pb.StageInfo(
                state=self._state(),
                weight_digests=rt.weight_digests(),
                dtype=rt.compiled.dtype,
                kv_dtype=rt.compiled.kv_dtype,
                kv_cache_bytes=rt.kv_cache_bytes,
                pid=os.getpid(),
                page_size=rt.kv_config.page_size,
                prefill_chunk=rt.prefill_chunk_size,
            )

    def _sequences(self, req: pb.SequencesRequest, context: grpc.ServicerContext) -> pb.StageState:
        with self._lock:
            try:
                for sid in req.remove:
                    self.runtime.remove_sequence(int(sid))
                for sid in req.add:
                    self.runtime.add_sequence(int(sid))
                for f in req.fork:
                    self.runtime.fork_sequence(int(f.parent), int(f.child), int(f.length))
                for p in req.pop:
                    self.runtime.popn(int(p.seq_id), int(p.n))
            except (ValueError, KeyError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sequences: {e}")
            return self._state()

    def _embed(self, req: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardReply:
        if not self.embeds:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"embed: stage {self.index} does not hold the table")
        try:
            ids = from_array(req.token_ids, "token_ids").astype(np.int32)
            if ids.ndim != 1 or not ids.size:
                raise ValueError(f"token_ids: expected [tokens], got {list(ids.shape)}")
            with self._lookup_lock:
                return pb.ForwardReply(hidden=to_array(self._lookup(ids)))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _logits(self, req: pb.LogitsRequest, context: grpc.ServicerContext) -> pb.ForwardReply:
        with self._lock:
            if self._kept is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "logits: no forward kept its hidden states")
            try:
                return pb.ForwardReply(logits=to_array(self.runtime.logits_at(self._kept, list(req.rows))))
            except (ValueError, tvm.error.TVMError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rows: {e}")

    def _read_kv(self, req: pb.ReadKVRequest, context: grpc.ServicerContext) -> pb.KVBlock:
        with self._lock:
            try:
                k, v = self.runtime.read_kv(int(req.seq_id), int(req.begin), int(req.end))
            except (ValueError, KeyError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"read_kv: {e}")
        return pb.KVBlock(k=to_array(k), v=to_array(v))

    def _append_kv(self, req: pb.AppendKVRequest, context: grpc.ServicerContext) -> pb.StageState:
        try:
            k, v = from_array(req.kv.k, "kv.k"), from_array(req.kv.v, "kv.v")
            with self._lock:
                self.runtime.append_kv(int(req.seq_id), k, v)
                return self._state()
        except (ValueError, KeyError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"append_kv: {e}")
        except MemoryError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"append_kv: {e}")

    # ---- KV stage to stage (kvtransfer.route) ------------------------------------------------------------
    def _open_kv(self, req: pb.OpenKVRequest, context: grpc.ServicerContext) -> pb.OpenKVReply:
        with self._kv_lock:
            if self._kv_rx is None:
                self._kv_rx = GrpcKVReceiver(
                    self.parts.add,
                    host=self.host,
                    on_orphaned=lambda h: self.parts.drop(h.request_id),
                    token=self.token,
                    tls=self.tls,
                    **receiver_checks(self.runtime, stage_layers=self.layers, fingerprint=req.fingerprint),
                )
                self._kv_fingerprint = req.fingerprint
                self._kv_rx.start()
            elif req.fingerprint != self._kv_fingerprint:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "fingerprint: the KV receiver runs for another")
            return pb.OpenKVReply(address=self._kv_rx.address)

    def _push_kv(self, req: pb.PushKVRequest, context: grpc.ServicerContext) -> pb.PushKVReply:
        try:
            route = KVRoute.parse(req.route)
            with self._lock:
                k, v = self.runtime.read_kv(int(req.seq_id), int(req.begin), int(req.end))  # [layers, n, Hkv, d]
        except (ValueError, KeyError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"push_kv: {e}")
        with self._kv_lock:
            if self._kv_tx is None:
                self._kv_tx = GrpcKVSender(token=self.token, tls=self.tls)
        rt = self.runtime
        r = push_parts(
            self._kv_tx,
            self._kv_pool,
            k,
            v,
            self.layers.start,
            rt.config.num_hidden_layers,
            int(req.begin),
            req.request_id,
            req.fingerprint,
            rt.kv_config.page_size,
            route,
            req.timeout_s,
        )
        return pb.PushKVReply(
            ok=r.ok,
            error=r.error.value if r.error else "",
            message=r.message,
            nbytes=r.nbytes,
            transfer_s=r.transfer_s,
            import_s=r.import_s,
        )

    def _commit_kv(self, req: pb.CommitKVRequest, context: grpc.ServicerContext) -> pb.StageState:
        rid, begin, end = req.request_id, int(req.begin), int(req.end)
        try:
            if not req.apply:
                self.parts.check(rid, begin, end)
                return self._state()
            with self._lock:
                k, v = self.parts.take(rid, begin, end)
                self.runtime.append_kv(int(req.seq_id), k, v)
                return self._state()
        except PayloadError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"commit_kv: {e.message}")
        except (ValueError, KeyError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"commit_kv: {e}")
        except MemoryError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"commit_kv: {e}")

    def _drop_kv(self, req: pb.DropKVRequest, context: grpc.ServicerContext) -> pb.StageState:
        self.parts.drop(req.request_id)
        return self._state()

    def _forward(self, req: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardReply:
        last = self.index == self.count - 1
        try:
            seq_ids, lengths = [int(s) for s in req.seq_ids], [int(n) for n in req.lengths]
            if not seq_ids or len(seq_ids) != len(lengths) or min(lengths) < 1:
                raise ValueError("lengths: one length >= 1 per sequence id")
            if self.index == 0 and self.embeds:
                x = from_array(req.token_ids, "token_ids").astype(np.int32)
                if x.shape != (sum(lengths),):
                    raise ValueError(f"token_ids: expected [{sum(lengths)}], got {list(x.shape)}")
            else:
                h = from_array(req.hidden, "hidden")
                if h.shape != (sum(lengths), self.runtime.config.hidden_size):
                    raise ValueError(f"hidden: expected [{sum(lengths)}, hidden], got {list(h.shape)}")
                x = tvm.runtime.tensor(np.ascontiguousarray(h, dtype=self.runtime.compiled.dtype), self.runtime.device)
            with self._lock:  # only a forward that keeps its states replaces the kept ones: a decode of other
                if last and req.keep_hidden:  # sequences may run between a forward and its `Logits` calls
                    self._kept = None
                out = self.runtime.stage_forward(seq_ids, lengths, x)
                if last and req.keep_hidden:
                    self._kept = out
                    return pb.ForwardReply()
                if last:
                    return pb.ForwardReply(logits=to_array(self.runtime.logits_at(out, list(req.logit_rows))))
                return pb.ForwardReply(hidden=to_array(out.numpy().reshape(sum(lengths), -1)))
        except (ValueError, KeyError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


class StageClient:
    """The driver's handle on one stage server."""

    def __init__(self, address: str, token: str = "", tls: InternalTLS | None = None, timeout_s: float = 60.0) -> None:
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", -1)]
        self._channel = internal_channel(address, opts, tls)
        self._meta, self._timeout = token_metadata(token), timeout_s

        def method(name: str, req, rep):
            return self._channel.unary_unary(f"/{_SERVICE}/{name}", req.SerializeToString, rep.FromString)

        self._describe = method("Describe", pb.SequencesRequest, pb.StageInfo)
        self._seq = method("Sequences", pb.SequencesRequest, pb.StageState)
        self._fwd = method("Forward", pb.ForwardRequest, pb.ForwardReply)
        self._embed = method("Embed", pb.ForwardRequest, pb.ForwardReply)
        self._logits = method("Logits", pb.LogitsRequest, pb.ForwardReply)
        self._read = method("ReadKV", pb.ReadKVRequest, pb.KVBlock)
        self._append = method("AppendKV", pb.AppendKVRequest, pb.StageState)
        self._open_kv = method("OpenKV", pb.OpenKVRequest, pb.OpenKVReply)
        self._push_kv = method("PushKV", pb.PushKVRequest, pb.PushKVReply)
        self._commit_kv = method("CommitKV", pb.CommitKVRequest, pb.StageState)
        self._drop_kv = method("DropKV", pb.DropKVRequest, pb.StageState)

    def describe(self) -> pb.StageInfo:
        return self._describe(pb.SequencesRequest(), metadata=self._meta, timeout=self._timeout)

    def sequences(self, add: Sequence[int] = (), remove: Sequence[int] = (), fork=(), pop=()) -> pb.StageState:
        """`fork`: (parent, child, length) triples; `pop`: (seq_id, n) pairs."""
        req = pb.SequencesRequest(
            add=add,
            remove=remove,
            fork=[pb.Fork(parent=p, child=c, length=n) for p, c, n in fork],
            pop=[pb.Pop(seq_id=s, n=n) for s, n in pop],
        )
        return self._seq(req, metadata=self._meta, timeout=self._timeout)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        req = pb.ForwardRequest(token_ids=to_array(np.asarray(ids, dtype=np.int32)))
        return from_array(self._embed(req, metadata=self._meta, timeout=self._timeout).hidden, "hidden")

    def logits(self, rows: Sequence[int]) -> np.ndarray:
        reply = self._logits(pb.LogitsRequest(rows=rows), metadata=self._meta, timeout=self._timeout)
        return from_array(reply.logits, "logits")

    def read_kv_future(self, seq_id: int, begin: int, end: int) -> grpc.Future:
        req = pb.ReadKVRequest(seq_id=seq_id, begin=begin, end=end)
        return self._read.future(req, metadata=self._meta, timeout=self._timeout)

    def append_kv_future(self, seq_id: int, k: np.ndarray, v: np.ndarray) -> grpc.Future:
        req = pb.AppendKVRequest(seq_id=seq_id, kv=pb.KVBlock(k=to_array(k), v=to_array(v)))
        return self._append.future(req, metadata=self._meta, timeout=self._timeout)

    def forward(self, req: pb.ForwardRequest) -> pb.ForwardReply:
        return self._fwd(req, metadata=self._meta, timeout=self._timeout)

    def open_kv(self, fingerprint: str) -> str:
        """Start the stage's KV receiver (parts of its layers); its address."""
        return self._open_kv(
            pb.OpenKVRequest(fingerprint=fingerprint), metadata=self._meta, timeout=self._timeout
        ).address

    def push_kv_future(
        self, seq_id: int, request_id: str, begin: int, end: int, fingerprint: str, route: str, timeout_s: float
    ) -> grpc.Future:
        req = pb.PushKVRequest(
            seq_id=seq_id,
            request_id=request_id,
            begin=begin,
            end=end,
            fingerprint=fingerprint,
            route=route,
            timeout_s=timeout_s,
        )
        return self._push_kv.future(req, metadata=self._meta, timeout=timeout_s + self._timeout)

    def commit_kv_future(self, request_id: str, seq_id: int, begin: int, end: int, apply: bool) -> grpc.Future:
        req = pb.CommitKVRequest(request_id=request_id, seq_id=seq_id, begin=begin, end=end, apply=apply)
        return self._commit_kv.future(req, metadata=self._meta, timeout=self._timeout)

    def drop_kv_future(self, request_id: str) -> grpc.Future:
        return self._drop_kv.future(pb.DropKVRequest(request_id=request_id), metadata=self._meta, timeout=self._timeout)

    def forward_future(self, req: pb.ForwardRequest) -> grpc.Future:
        return self._fwd.future(req, metadata=self._meta, timeout=self._timeout)

    def close(self) -> None:
        self._channel.close()


class RemotePipeline(StageChain):
    """Stage servers chained by this driver: it calls each in order with the previous one's hidden states."""

    def __init__(self, clients: list[StageClient], vocab_size: int, prefill_chunk: int) -> None:
        self.clients = clients
        self.num_stages = len(clients)
        self.vocab_size, self.prefill_chunk = vocab_size, prefill_chunk
        self.states = [c.sequences() for c in clients]
        if [s.index for s in self.states] != list(range(len(clients))) or {s.count for s in self.states} != {
            len(clients)
        }:
            raise ValueError(f"stages out of order or of another split: {[(s.index, s.count) for s in self.states]}")
        self.embedding_stage = next(s.index for s in self.states if s.embeds)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self.clients[self.embedding_stage].embed(ids)

    def _request(self, i: int, seq_ids: Sequence[int], lengths: Sequence[int], x, rows: Sequence[int]):
        req = pb.ForwardRequest(seq_ids=seq_ids, lengths=lengths, logit_rows=rows if i == self.num_stages - 1 else ())
        if i == 0 and np.issubdtype(np.asarray(x).dtype, np.integer):
            req.token_ids.CopyFrom(to_array(np.asarray(x, dtype=np.int32)))
        else:
            req.hidden.CopyFrom(to_array(x))
        return req

    def _stage(self, i: int, seq_ids: Sequence[int], lengths: Sequence[int], x, rows: Sequence[int]):
        reply = self.clients[i].forward(self._request(i, seq_ids, lengths, x, rows))
        return from_array(reply.logits if i == self.num_stages - 1 else reply.hidden, "reply")

    def decode_microbatched(self, seq_ids: Sequence[int], tokens: Sequence[int], parts: int = 0) -> np.ndarray:
        """`decode`, with the batch cut into `parts` micro-batches (default: one per stage) that flow through the
        stages in a pipeline: at tick t stage i runs micro-batch t - i, so every stage works at once (each stage
        is a process of its own). Float32 logits [b, V], the same as `decode`'s."""
        parts = min(parts or self.num_stages, len(seq_ids))
        cuts = np.array_split(np.arange(len(seq_ids)), parts)
        inputs: dict[tuple[int, int], object] = {}  # (stage, micro-batch) -> its input
        first = self._first_input(np.asarray(tokens, dtype=np.int32))  # ids, or their rows [b, h] (one call)
        for m, idx in enumerate(cuts):
            inputs[0, m] = first[idx]
        out = np.empty((len(seq_ids), self.vocab_size), np.float32)
        for t in range(self.num_stages + parts - 1):
            calls = []
            for i in range(self.num_stages):
                m = t - i
                if 0 <= m < parts:
                    ids = [seq_ids[j] for j in cuts[m]]
                    req = self._request(i, ids, [1] * len(ids), inputs.pop((i, m)), list(range(len(ids))))
                    calls.append((i, m, self.clients[i].forward_future(req)))
            for i, m, call in calls:
                reply = call.result()
                if i == self.num_stages - 1:
                    out[cuts[m]] = from_array(reply.logits, "reply")
                else:
                    inputs[i + 1, m] = from_array(reply.hidden, "reply")
        return out

    def add_sequence(self, seq_id: int) -> None:
        self.states = [c.sequences(add=[seq_id]) for c in self.clients]

    def remove_sequence(self, seq_id: int) -> None:
        self.states = [c.sequences(remove=[seq_id]) for c in self.clients]

    def close(self) -> None:
        for c in self.clients:
            c.close()


def main(argv: list[str] | None = None) -> int:
    """Serve one stage in this process until stdin closes (tests and tools; serve wires stages as actors)."""
    p = argparse.ArgumentParser(prog="python -m engine.stages", description="serve one pipeline stage over gRPC")
    p.add_argument("--model", required=True)
    p.add_argument("--stage", required=True, help="I/N: stage I (0-based) of N")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--max-total-seq-len", type=int, default=1024)
    p.add_argument("--max-batch-size", type=int, default=16)
    args = p.parse_args(argv)
    from pathlib import Path

    from llama_relax.compile import resolve_target
    from llama_relax.loader import resolve_model
    from llama_relax.pipeline import open_stage
    from llama_relax.process import use_all_cores
    from llama_relax.runtime import KVCacheConfig
    from llama_relax.stage_model import StageSpec

    use_all_cores()
    index, count = (int(x) for x in args.stage.split("/"))
    runtime = open_stage(
        resolve_model(Path(args.model)),
        StageSpec(index, count),
        target=resolve_target(),
        cache_dir=Path(args.cache_dir),
        kv=KVCacheConfig(args.max_batch_size, args.max_total_seq_len, prefill_chunk_size=512),
        kv_cache_dtype=args.kv_cache_dtype,
    )
    server = StageServer(runtime, token=os.environ.get("PDSERVE_CLUSTER_TOKEN", ""))
    print(f"stage ready on {server.start()}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or exits)
    server.stop()
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
