"""`StagedRuntime`: a worker's pipeline stages (stage servers, `engine.stages`) behind the `ModelRuntime` calls the
engines make, so the prefill, decode and colocated engines run on S stages unchanged.

What it does per call:
  - sequence calls (add, remove, fork, popn) go to every stage, which all keep the same sequences; lengths are
    kept here;
  - `forward_hidden` chains the stages (hidden states `[tokens, hidden]` hop by hop) and leaves the last stage's
    states there; `logits_at` asks the last stage for rows of them (speculative verify asks twice);
  - `decode` flows the batch through the stages in micro-batches (`RemotePipeline.decode_microbatched`);
  - `decode_submit` / `decode_collect` keep up to `pipeline_depth` (= S) decode forwards of different sequences
    in flight across engine steps (vLLM's virtual engines): while the engine samples one group's tokens and
    submits its next step, the other groups are in the other stages, so every stage works all the time. A call
    on a sequence in flight (remove, fork, popn, KV, another forward) first waits for its forward to land;
  - KV between pools moves stage to stage (`kvtransfer.route`): as a prefill worker, `push_kv` has every stage
    send its layers of a piece to the decode endpoints holding them, at once; as a decode worker, `kv_route`
    opens a KV receiver on every stage, which holds the parts it gets, and the manifest that follows them makes
    `commit` check every stage holds all its layers, then append them everywhere. Any stage counts pair up
    (P1 -> D2, P2 -> D1, P3 -> D2). `read_kv` / `append_kv` still gather and split all-layer K/V here (a whole
    payload from a sender that does not scatter, and tests).

Failures: a stage's refusal (bad input, no pages) is the error the one-process runtime raises (`ValueError`,
`MemoryError`). A stage that is gone (its process died, the channel broke) makes `on_lost` run: the hosting worker
exits there, so its requests migrate and Ray restarts the worker with new stages (`engine.stage_actors`).

Call order: one thread (the engine's) makes every call, as with `ModelRuntime` (a submitted decode runs on a
thread of this object's, its result read by `decode_collect` on the engine's); `close()` last.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import tvm

from engine.stages import RemotePipeline, StageClient, from_array
from kvtransfer.payload import ErrorCode, KVHeader, PayloadError
from kvtransfer.route import Endpoint, KVRoute, combine
from kvtransfer.transport import TransferResult
from llama_relax.config import LlamaConfig
from llama_relax.kv_dtype import kv_storage
from llama_relax.runtime import KVCacheConfig, model_fingerprint
from llama_relax.sequences import SequenceBook

_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT: ValueError,
    grpc.StatusCode.FAILED_PRECONDITION: ValueError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: MemoryError,
}


class StageLost(RuntimeError):
    """A stage of this worker is gone (its process died or its channel broke)."""


@dataclass(frozen=True)
class PipelineLibrary:
    """What the engines read of a runtime's `compiled`: the dtypes every stage was built with, and a path in the
    cache named for this pipeline (files measured for it sit beside it, e.g. the speculation cost curve)."""

    dtype: str
    kv_dtype: str
    lib_path: Path
    stage: tuple[int, int] | None = None


@dataclass(frozen=True)
class Flight:
    """One decode forward in flight (`decode_submit`): its sequences and the future of its logits [b, V]."""

    seq_ids: tuple[int, ...]
    future: futures.Future


@dataclass(frozen=True)
class _Kept:
    """The last stage's states of one forward (`forward_hidden`), read by `logits_at` until the next forward."""

    forward: int


class StagedRuntime(RemotePipeline, SequenceBook):
    """A pipeline of stage servers with the `ModelRuntime` surface the engines use; see the module docstring."""

    host_kv = False  # the pages live in the stage processes: KV leaves through `read_kv`
    device = tvm.cpu()  # this process computes nothing; KV and logits come to host memory

    def __init__(
        self,
        clients: list[StageClient],
        config: LlamaConfig,
        kv_config: KVCacheConfig,
        on_lost: Callable[[BaseException], None],
        cache_dir: Path,
    ) -> None:
        self.on_lost = on_lost
        self.clients = clients
        infos = [self._rpc(c.describe) for c in clients]
        super().__init__(clients, config.vocab_size, min(i.prefill_chunk for i in infos))
        self.infos = infos
        kinds = {(i.dtype, i.kv_dtype, i.page_size) for i in infos}
        if len(kinds) != 1:
            raise ValueError(f"stages built differently (dtype, KV dtype, page size): {sorted(kinds)}")
        dtype, kv_dtype, page_size = kinds.pop()
        if page_size != kv_config.page_size:
            raise ValueError(f"stages use page size {page_size}, this worker {kv_config.page_size}")
        layers = [(i.state.first_layer, i.state.num_layers) for i in infos]
        if layers != [(r.start, len(r)) for r in config.layer_ranges(len(clients))]:
            raise ValueError(f"stage layer ranges {layers} do not split the model's {config.num_hidden_layers}")
        self.config, self.kv_config = config, kv_config
        self.kv_elem, self.kv_row = kv_storage(kv_dtype, config.head_dim)
        self.num_kv_layers = config.num_hidden_layers
        self.prefill_chunk_size = self.prefill_chunk
        self.kv_cache_bytes = sum(i.kv_cache_bytes for i in infos)
        digests = {name: d for i in infos for name, d in i.weight_digests.items()}
        self._fingerprint = model_fingerprint(config, dtype, kv_dtype, page_size, digests)
        name = f"pipeline-{self._fingerprint[:16]}-{len(clients)}stages"
        self.compiled = PipelineLibrary(dtype, kv_dtype, Path(cache_dir) / name)
        self._seq_lens: dict[int, int] = {}
        self._forwards = 0
        self._pool = futures.ThreadPoolExecutor(len(clients), thread_name_prefix="stage-call")
        self.pipeline_depth = len(clients)  # decode forwards the engine may keep in flight
        self._flying: dict[int, Flight] = {}  # sequence id -> the decode forward it is in
        self._flights = futures.ThreadPoolExecutor(len(clients), thread_name_prefix="stage-flight")

    # ---- errors -------------------------------------------------------------------------------------------
    def _rpc(self, fn: Callable, *args):
        """`fn(*args)` (a stage call, or a future's `result`) with gRPC errors turned into the runtime's."""
        try:
            return fn(*args)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            if code in _REFUSALS:
                raise _REFUSALS[code](e.details()) from None
            lost = StageLost(f"a pipeline stage is gone: {code}: {e.details() if isinstance(e, grpc.Call) else e}")
            self.on_lost(lost)
            raise lost from None

    def _all(self, call: Callable[[StageClient], grpc.Future]) -> list:
        """`call` on every stage at once; their results in stage order."""
        pending = [call(c) for c in self.clients]
        return [self._rpc(f.result) for f in pending]

    def _sequences(self, **change) -> None:
        self._all(lambda c: self._pool.submit(c.sequences, **change))

    # ---- sequences ----------------------------------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        self._check_new(seq_id)
        self._sequences(add=[seq_id])
        self._seq_lens[seq_id] = 0

    def remove_sequence(self, seq_id: int) -> None:
        self._settle([seq_id])
        self._flying.pop(seq_id, None)
        if self._seq_lens.pop(seq_id, None) is not None:
            self._sequences(remove=[seq_id])

    def fork_sequence(self, parent_id: int, child_id: int, length: int | None = None) -> None:
        self._settle([parent_id])
        length = self._check_fork(parent_id, child_id, length)
        self._sequences(fork=[(parent_id, child_id, length)])
        self._seq_lens[child_id] = length

    def popn(self, seq_id: int, n: int) -> None:
        self._settle([seq_id])
        self._check_popn(seq_id, n)
        self._sequences(pop=[(seq_id, n)])
        self._seq_lens[seq_id] -= n

    def free_pages(self) -> int:
        """The fewest free pages of any stage (they hold the same sequences, so they agree when all is well)."""
        return min(s.free_pages for s in self._all(lambda c: self._pool.submit(c.sequences)))

    # ---- forward ------------------------------------------------------------------------------------------
    def _appended(self, seq_ids: Sequence[int], lengths: Sequence[int], run: Callable[[], object]):
        """Run a forward appending `lengths[i]` tokens to `seq_ids[i]` on every stage. If it fails, the sequences
        are removed everywhere (stages before the failing one appended already), as `ModelRuntime` does."""
        self._settle(seq_ids)
        self._check_append(seq_ids, lengths)
        try:
            out = run()
        except StageLost:
            raise
        except BaseException:
            for sid in seq_ids:
                self.remove_sequence(sid)
            raise
        self._grown(seq_ids, lengths)
        return out

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self._rpc(super()._embed, ids)

    def _stage(self, i: int, seq_ids: Sequence[int], lengths: Sequence[int], x, rows: Sequence[int]):
        return self._rpc(super()._stage, i, seq_ids, lengths, x, rows)

    def _forward(self, seq_ids: Sequence[int], chunks: Sequence[Sequence[int]], rows: Sequence[int]) -> np.ndarray:
        return self._appended(
            seq_ids, [len(c) for c in chunks], lambda: super(StagedRuntime, self)._forward(seq_ids, chunks, rows)
        )

    def forward_hidden(self, seq_ids: Sequence[int], chunks: Sequence[Sequence[int]]) -> _Kept:
        """Append `chunks[i]` to `seq_ids[i]` on every stage; a handle on the last stage's states for `logits_at`."""
        lengths = [len(c) for c in chunks]
        if sum(lengths) > self.prefill_chunk_size:
            raise ValueError(f"forward of {sum(lengths)} tokens exceeds the prefill chunk ({self.prefill_chunk_size})")

        def run() -> None:
            x = self._first_input(np.fromiter((t for c in chunks for t in c), dtype=np.int32, count=sum(lengths)))
            for i in range(self.num_stages - 1):
                x = self._stage(i, seq_ids, lengths, x, ())
            req = self._request(self.num_stages - 1, seq_ids, lengths, x, ())
            req.keep_hidden = True
            self._rpc(self.clients[-1].forward, req)

        self._appended(seq_ids, lengths, run)
        self._forwards += 1
        return _Kept(self._forwards)

    def logits_at(self, hidden: _Kept, positions: Sequence[int]) -> np.ndarray:
        """Float32 logits [len(positions), V] of rows of the forward `hidden` names (the latest one only)."""
        if hidden.forward != self._forwards:
            raise ValueError("logits_at: only the latest forward's states are kept")
        return self._rpc(self.clients[-1].logits, list(positions))

    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One token per sequence, micro-batched across the stages; float32 logits [b, V]."""
        return self._appended(seq_ids, [1] * len(seq_ids), lambda: self._rpc(self.decode_microbatched, seq_ids, tokens))

    def decode_submit(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> Flight:
        """Start `decode` of `seq_ids` (a token each, none of them in flight) and return at once. The caller
        keeps at most `pipeline_depth` flights and reads each with `decode_collect`, oldest first."""
        lengths = [1] * len(seq_ids)
        self._settle(seq_ids)
        self._check_append(seq_ids, lengths)
        flight = Flight(tuple(seq_ids), self._flights.submit(self.decode_microbatched, list(seq_ids), list(tokens), 1))
        for sid in seq_ids:
            self._flying[sid] = flight
        self._grown(seq_ids, lengths)  # as if it succeeds; if it fails, `decode_collect` removes the sequences
        return flight

    def decode_collect(self, flight: Flight) -> np.ndarray:
        """Float32 logits [b, V] of a submitted decode (waiting for it). If it failed, its sequences are removed
        everywhere and the error raised, as `decode` does."""
        try:
            return self._rpc(flight.future.result)
        except StageLost:
            raise
        except BaseException:
            for sid in flight.seq_ids:
                self.remove_sequence(sid)
            raise
        finally:
            for sid in flight.seq_ids:
                if self._flying.get(sid) is flight:
                    del self._flying[sid]

    def _settle(self, seq_ids: Sequence[int]) -> None:
        """Wait until no decode forward of `seq_ids` is running (its result stays for `decode_collect`)."""
        if self._flying:
            futures.wait({self._flying[sid].future for sid in seq_ids if sid in self._flying})

    # ---- KV -----------------------------------------------------------------------------------------------
    def kv_shape(self, n_tokens: int) -> tuple[int, int, int, int]:
        return (self.num_kv_layers, n_tokens, self.config.num_key_value_heads, self.kv_row)

    def read_kv(self, seq_id: int, begin: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V of tokens [begin, end), every layer: [L, n, Hkv, d] each (each stage's layers, in order)."""
        self._settle([seq_id])
        self._check_range(seq_id, begin, end)
        blocks = self._all(lambda c: c.read_kv_future(seq_id, begin, end))
        k = np.concatenate([from_array(b.k, "k") for b in blocks])
        v = np.concatenate([from_array(b.v, "v") for b in blocks])
        return k, v

    def append_kv(self, seq_id: int, k: np.ndarray, v: np.ndarray) -> None:
        """Append n tokens of every layer's K/V ([L, n, Hkv, d]): each stage takes its own layers. Checked here
        first; if a stage fails after others appended, the sequence is removed everywhere and the error raised."""
        self._settle([seq_id])
        n = self._check_kv(seq_id, k, v)
        ranges = self.config.layer_ranges(self.num_stages)

        def run() -> None:
            calls = [
                c.append_kv_future(seq_id, k[r.start : r.stop], v[r.start : r.stop])
                for c, r in zip(self.clients, ranges, strict=True)
            ]
            errors = []
            for call in calls:
                try:
                    self._rpc(call.result)
                except (ValueError, MemoryError) as e:
                    errors.append(e)
            if errors:
                raise errors[0]

        self._appended([seq_id], [n], run)

    def kv_fingerprint(self) -> str:
        return self._fingerprint

    # ---- KV stage to stage (kvtransfer.route) -------------------------------------------------------------
    def push_kv(
        self, seq_id: int, request_id: str, begin: int, end: int, route: KVRoute, timeout_s: float
    ) -> TransferResult:
        """Every stage sends its layers of tokens [begin, end) of `seq_id` to the endpoints of `route` holding them,
        all at once; one result for all (any thread: the stages read their pages under their own locks)."""
        text = route.encode()
        calls = [
            c.push_kv_future(seq_id, request_id, begin, end, self._fingerprint, text, timeout_s) for c in self.clients
        ]
        results = []
        for call in calls:
            try:
                r = self._rpc(call.result)
            except (ValueError, MemoryError) as e:
                results.append(TransferResult.failure(ErrorCode.IMPORT_FAILED, f"stage refused the push: {e}"))
                continue
            error = ErrorCode.parse(r.error) if not r.ok else None
            results.append(TransferResult(r.ok, error, r.message, r.nbytes, r.transfer_s, r.import_s))
        return combine(results)

    def kv_route(self, commit: str) -> str:
        """Open a KV receiver on every stage; the route a prefill worker sends to (`commit`: this worker's own)."""
        ends = [self._rpc(c.open_kv, self._fingerprint) for c in self.clients]
        ranges = self.config.layer_ranges(self.num_stages)
        return KVRoute(commit, tuple(Endpoint(a, r.start, len(r)) for a, r in zip(ends, ranges, strict=True))).encode()

    def hold(self, header: KVHeader, k, v) -> None:
        raise PayloadError(ErrorCode.SHAPE_MISMATCH, "this worker's layers sit in stages: send parts to its route")

    def commit(self, seq_id: int, header: KVHeader) -> None:
        """Append the parts of `header`'s tokens that every stage holds to `seq_id`: first check that each stage
        holds all its layers (TRUNCATED naming the stage and what is missing), then append on all at once."""
        self._settle([seq_id])
        rid, begin, end = header.request_id, header.begin, header.end
        self._check_append([seq_id], [end - begin])
        if self._seq_lens.get(seq_id) != begin:
            raise PayloadError(
                ErrorCode.SHAPE_MISMATCH,
                f"payload starts at {begin}; sequence {seq_id} holds {self._seq_lens.get(seq_id)}",
            )
        checks = [c.commit_kv_future(rid, seq_id, begin, end, False) for c in self.clients]
        for i, call in enumerate(checks):
            try:
                self._rpc(call.result)
            except ValueError as e:
                raise PayloadError(ErrorCode.TRUNCATED, f"stage {i}: {e}") from None
        self._appended(
            [seq_id], [end - begin], lambda: self._all(lambda c: c.commit_kv_future(rid, seq_id, begin, end, True))
        )

    def drop(self, request_id: str) -> None:
        """Forget the parts the stages hold for `request_id` (it ended before they were committed), without waiting:
        a thread of this object's holds the calls until they are answered (a gRPC call dropped is cancelled)."""
        calls = [c.drop_kv_future(request_id) for c in self.clients]
        with contextlib.suppress(RuntimeError):  # closed: the stages go with it
            self._pool.submit(lambda: [c.exception() for c in calls])

    def close(self) -> None:
        self._flights.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False)
        super().close()
