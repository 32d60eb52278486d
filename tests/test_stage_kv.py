"""KV straight from stage to stage (#28): a prefill worker's stages each send their layers to the decode stages
holding them, in parallel, and the decode worker commits a piece only when every stage holds all its layers.

Real engines (threads started), real stage servers over gRPC with the cluster token, real KV receivers, the tiny
model with the tied table: P1 -> D2 (one sender, two parts per piece), P2 -> D1 (two senders into one receiver),
P3 -> D2 (overlapping ranges: a decode stage gets parts from two prefill stages), P2 -> D2. Each streams a prompt
in several pieces; the decode side's KV is bit-identical to the prefill side's, the tokens equal P1 -> D1's
(whole payloads), and nothing leaks: pages, sequences, parts held on stages. A manifest whose parts one stage
lacks is refused (TRUNCATED) with nothing appended anywhere; a part with a wrong or no token is refused
(UNAUTHENTICATED) with nothing held."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import pytest
from model_files import write_hf_dir
from reference import random_params
from test_engines import Collect, assert_no_leaks, engine_options
from test_stages import CFG

from decode_worker.engine import DecodeEngine
from decode_worker.worker import start_decode
from engine.kvmeta import PARTIAL
from engine.loop import OutputStream
from engine.messages import ErrorKind, GenerationRequest, Role
from engine.staged_runtime import StagedRuntime
from engine.stages import StageClient, StageServer
from kvtransfer.auth import new_cluster_token
from kvtransfer.grpc_transport import GrpcKVSender
from kvtransfer.payload import ErrorCode, make_manifest, make_payload
from kvtransfer.route import KVRoute
from llama_relax.models import open_model
from llama_relax.pipeline import open_pipeline
from llama_relax.runtime import KVCacheConfig
from llama_relax.sampling import SamplingParams
from prefill_worker.engine import PrefillEngine
from prefill_worker.worker import start_prefill

KV = KVCacheConfig(max_batch_size=8, max_total_seq_len=1024, prefill_chunk_size=32)
MODEL_CFG = CFG.replace(tie_word_embeddings=True)
PROMPT_LEN = 150  # 5 chunks of 32: streamed as several pieces
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@dataclass
class Side:
    """One worker's model: a one-process runtime, or a `StagedRuntime` over in-process stage servers."""

    runtime: object
    tokenizer: None
    servers: list[StageServer]
    closers: list

    def close(self) -> None:
        for fn in self.closers:
            with contextlib.suppress(Exception):
                fn()


def open_side(path, stages: int, cache_dir, token: str) -> Side:
    if stages == 1:
        m = open_model(path, cache_dir=cache_dir, kv=KV, quiet=True, kv_cache_dtype="float16")
        return Side(m.runtime, None, [], [m.close])
    pipe = open_pipeline(path, stages, cache_dir=cache_dir, kv=KV, kv_cache_dtype="float16")
    servers = [StageServer(rt, token=token) for rt in pipe.stages]
    clients = [StageClient(s.start(), token) for s in servers]
    lost: list[BaseException] = []
    rt = StagedRuntime(clients, MODEL_CFG, KV, lost.append, cache_dir)
    return Side(rt, None, servers, [rt.close, *(s.stop for s in servers), pipe.close])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_hf_dir(tmp_path_factory.mktemp("stage-kv"), MODEL_CFG, random_params(MODEL_CFG, seed=12))


def prompt(seed: int) -> tuple[int, ...]:
    rng = np.random.default_rng(seed)
    return tuple(int(t) for t in rng.integers(0, MODEL_CFG.vocab_size, PROMPT_LEN))


@dataclass
class Pair:
    """A prefill engine on P stages and a decode engine on D stages, both running, KV over real gRPC."""

    p: PrefillEngine
    d: DecodeEngine
    address: str  # the decode worker's KV route
    ds: Side


@contextlib.contextmanager
def pair(model_path, cache_dir, prefill_stages: int, decode_stages: int):
    """Both engines; at the end, a leak check on both (pages, sequences) and on the decode stages (parts)."""
    token = new_cluster_token()
    opts = engine_options(max_batch_size=8, cluster_token=token, prefill_chunk_size=32, kv_stream_tail=0)
    ps = open_side(model_path, prefill_stages, cache_dir, token)
    ds = open_side(model_path, decode_stages, cache_dir, token)
    try:
        d, receiver, address = start_decode(ds, opts, Role.DECODE)
        p, sender = start_prefill(ps, opts)
        d.start()
        p.start()
        try:
            yield Pair(p, d, address, ds)
            wait_for(lambda: not p.jobs and not d.seqs)
            assert_no_leaks(p, d)
            wait_for(lambda: all(len(s.parts) == 0 for s in ds.servers))  # (a drop is sent without waiting)
            if not ds.servers:
                assert len(d.landing.parts) == 0
        finally:
            p.close()
            d.close()
            receiver.stop(0)
            sender.close()
    finally:
        ps.close()
        ds.close()


def wait_for(done, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "did not get there"
        time.sleep(0.01)


def submit(pr: Pair, req: GenerationRequest) -> tuple[OutputStream, Collect]:
    """Reserve on D, prefill on P with D's route; the decode stream and the prefill's events once it ended."""
    admission, stream = pr.d.reserve(req)
    assert admission.ok
    out = Collect()
    assert pr.p.submit(req, pr.address, out).ok
    assert out.done.wait(60)
    return stream, out


def run_one(pr: Pair, seed: int = 5):
    """One request prefilled on P and decoded on D; (tokens, prefill KV, decode KV of its prompt, result)."""
    req = GenerationRequest(f"r{seed}", prompt(seed), GREEDY)
    stream, out = submit(pr, req)
    result = out.items[-1]
    assert result.ok, result
    events = []
    while not events or events[-1].finish_reason is None:
        events.append(stream.get(timeout=60))
    tokens = [out.items[0].token_id] + [e.token_id for e in events]

    def kv_of(engine):  # the prompt's KV in the engine's prefix cache entry
        def read():
            (entry,) = [e for e in engine.cache.entries.values() if e.tokens[:PROMPT_LEN] == req.prompt_ids]
            return engine.runtime.read_kv(entry.seq_id, 0, PROMPT_LEN)

        return engine.call(read)

    return tokens, kv_of(pr.p), kv_of(pr.d), result


@pytest.mark.parametrize(
    ("prefill", "decode"), [(1, 2), (2, 1), (3, 2), (2, 2)], ids=["P1-D2", "P2-D1", "P3-D2", "P2-D2"]
)
def test_stage_to_stage_kv_is_bit_identical_and_gives_the_tokens_of_whole_payloads(
    model_path, cache_dir, prefill, decode
):
    with pair(model_path, cache_dir, prefill, decode) as pr:
        if decode > 1:
            assert len(KVRoute.parse(pr.address).endpoints) == decode  # a receiver per stage
        tokens, pk, dk, result = run_one(pr)
    assert result.kv_pieces > 1  # streamed while the prompt prefilled
    for a, b in zip(pk, dk, strict=True):
        assert a.dtype == np.float16 and a.shape[:2] == (MODEL_CFG.num_hidden_layers, PROMPT_LEN)
        assert a.tobytes() == b.tobytes()
    with pair(model_path, cache_dir, 1, 1) as pr:  # whole payloads, one process each side
        whole, *_ = run_one(pr)
    assert tokens == whole


def test_a_decode_stage_that_refuses_its_parts_fails_the_transfer_and_nothing_is_left(model_path, cache_dir):
    """P2 -> D2 with decode stage 1's receiver gone: the push fails (retried once), the request fails as
    TRANSFER_FAILED, the parts stage 0 got are dropped when the decode side ends the request, no page leaks; the
    next request, with the receiver back, goes through."""
    with pair(model_path, cache_dir, 2, 2) as pr:
        route = KVRoute.parse(pr.address)
        gone = pr.ds.servers[1]
        rx, gone._kv_rx = gone._kv_rx, None
        rx.stop(0)
        stream, out = submit(pr, GenerationRequest("lost", prompt(9), GREEDY))
        result = out.items[-1]
        assert result.error is not None and result.error.kind is ErrorKind.TRANSFER_FAILED, result
        assert "UNAVAILABLE" in result.error.message and result.transfer_retries == 1
        assert len(pr.ds.servers[0].parts) > 0  # stage 0 holds its part of the first piece, uncommitted
        assert pr.d.cancel("lost")  # what the router does with a failed transfer
        assert stream.get(timeout=10).kind is ErrorKind.CANCELLED
        wait_for(lambda: len(pr.ds.servers[0].parts) == 0)
        pr.address = pr.d.runtime.kv_route(route.commit)  # the receiver back (a new one, on another port)
        assert KVRoute.parse(pr.address).endpoints[1] != route.endpoints[1]
        tokens, pk, dk, _ = run_one(pr, seed=10)
        assert pk[0].tobytes() == dk[0].tobytes() and len(tokens) == GREEDY.max_tokens


def test_leaks_and_refusals_on_decode_stages(model_path, cache_dir):
    """Pages, sequences and parts back at the end; a manifest one stage lacks parts for appends nothing; parts
    with a wrong or no cluster token are refused before anything is held."""
    token = new_cluster_token()
    opts = engine_options(max_batch_size=8, cluster_token=token, prefill_chunk_size=32)
    ds = open_side(model_path, 2, cache_dir, token)
    d, receiver, address = start_decode(ds, opts, Role.DECODE)
    d.start()
    route = KVRoute.parse(address)
    rt: StagedRuntime = ds.runtime
    fp, n = rt.kv_fingerprint(), 20
    shape = (MODEL_CFG.num_hidden_layers, n - 1, MODEL_CFG.num_key_value_heads, MODEL_CFG.head_dim)  # a piece
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal(shape).astype(np.float16) for _ in range(2))
    senders = {t: GrpcKVSender(token=t) for t in (token, "wrong", "")}
    try:
        req = GenerationRequest("m", prompt(1)[:n], GREEDY)
        admission, stream = d.reserve(req)
        assert admission.ok
        e0, _ = route.endpoints
        for bad in ("wrong", ""):
            part = make_payload(k[e0.layers], v[e0.layers], fp, 0, "m", page_size=KV.page_size, first_layer=0)
            r = senders[bad].send(part, e0.address, 10)
            assert not r.ok and r.error is ErrorCode.UNAUTHENTICATED
        assert [s.parts.nbytes for s in ds.servers] == [0, 0]
        part0 = make_payload(k[e0.layers], v[e0.layers], fp, 0, "m", page_size=KV.page_size)
        assert senders[token].send(part0, e0.address, 10).ok
        assert [len(s.parts) for s in ds.servers] == [1, 0]
        elem, row = rt.kv_elem, rt.kv_row
        manifest = make_manifest(fp, elem, MODEL_CFG.num_key_value_heads, row, KV.page_size, 0, n - 1, "m", PARTIAL)
        r = senders[token].send(manifest, route.commit, 10)
        assert not r.ok and r.error is ErrorCode.TRUNCATED and "stage 1" in r.message, r
        seq = d.call(lambda: d.seqs["m"].seq_id)
        assert [s.runtime.sequence_length(seq) for s in ds.servers] == [0, 0]  # nothing appended anywhere
        assert d.cancel("m")
        assert stream.get(timeout=10).kind is ErrorKind.CANCELLED
        wait_for(lambda: [len(s.parts) for s in ds.servers] == [0, 0])  # (the drop is sent without waiting)
        assert_no_leaks(d)
    finally:
        for s in senders.values():
            s.close()
        d.close()
        receiver.stop(0)
        ds.close()
