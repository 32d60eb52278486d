"""Prefill worker + decode worker as Ray actors on a loopback cluster (KV over real gRPC) against the colocated
worker, with the real tiny compiled model, driven by the serving `Router` over the same Ray clients `pdserve serve`
uses: identical greedy and seeded outputs, continuous batching, and clean outcomes with no leaked pages for
cancels, transfer failures and exhausted pages. Protocol-level races (a cancel before the KV push, pages taken)
are driven through the Ray clients directly."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import numpy as np
import pytest
from conftest import TINY_GQA
from model_files import write_hf_dir
from ray_cluster import listeners_beyond_loopback, local_ray
from reference import random_params

from engine.messages import ErrorKind, GenerationRequest, RequestError, Role, WorkerOptions
from llama_relax.generation import TokenEvent
from llama_relax.sampling import SamplingParams
from router.clients import RayDecodeClient, RayPrefillClient
from router.pools import Pools, WorkerSlot
from router.router import Done, Router, RouterError, RouterOptions, ServeMode

LENGTHS = [5, 40, 17, 3, 9, 33, 12, 21]  # 40 and 33 exceed the 32-token prefill chunk


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, compiled_gqa, cache_dir):
    model = write_hf_dir(tmp_path_factory.mktemp("workers-model"), TINY_GQA, random_params(TINY_GQA, seed=6))
    from decode_worker.worker import ColocatedWorker, DecodeWorker
    from prefill_worker.worker import PrefillWorker

    opts = WorkerOptions(
        model=str(model), cache_dir=str(cache_dir), max_batch_size=16, max_total_seq_len=2048, prefill_chunk_size=32
    )
    small = WorkerOptions(
        model=str(model),
        cache_dir=str(cache_dir),
        max_batch_size=4,
        max_total_seq_len=64,
        prefill_chunk_size=32,
        output_slice=4,
    )
    with local_ray({"prefill": 2, "decode": 2}) as ray:
        actor = {"max_concurrency": 64, "num_cpus": 0}
        handles = {
            "prefill": ray.remote(PrefillWorker).options(resources={"prefill": 1}, **actor).remote(opts),
            "decode": ray.remote(DecodeWorker).options(resources={"decode": 1}, **actor).remote(opts),
            "colocated": ray.remote(ColocatedWorker).options(**actor).remote(opts),
            "small_decode": ray.remote(DecodeWorker).options(resources={"decode": 1}, **actor).remote(small),
        }
        ray.get([h.ping.remote() for h in handles.values()])
        yield ray, handles
        for h in handles.values():
            ray.get(h.shutdown.remote())


def router_over(ray, mode: ServeMode, **slots) -> Router:
    """The serving router over these actors, through the same Ray clients `pdserve serve` uses."""
    pools = Pools()
    clients = {"prefill": RayPrefillClient, "decode": RayDecodeClient, "colocated": RayDecodeClient}
    for role, (name, handle) in slots.items():
        pool = getattr(pools, role)
        pool.append(WorkerSlot(name, Role(role), clients[role](ray, handle, name)))
    pools.refresh()
    return Router(pools, mode, RouterOptions(local_prefill_max_tokens=0, migration_limit=0, max_queue_wait_s=1.0))


def run(router: Router, req: GenerationRequest, on_event=None) -> list[TokenEvent] | RouterError:
    """One request through `Router.generate`: its token events, or its failure."""
    out: list[TokenEvent] = []
    try:
        for item in router.generate(req):
            if isinstance(item, Done):
                return out
            out.append(item)
            if on_event is not None:
                on_event(item)
    except RouterError as e:
        return e
    raise AssertionError("the router ended without Done")


@pytest.fixture(scope="module")
def routers(cluster):
    ray, h = cluster
    disagg = router_over(ray, ServeMode.DISAGGREGATED, prefill=("p", h["prefill"]), decode=("d", h["decode"]))
    colocated = router_over(ray, ServeMode.COLOCATED, colocated=("c", h["colocated"]))
    small = router_over(ray, ServeMode.DISAGGREGATED, prefill=("p", h["prefill"]), decode=("s", h["small_decode"]))
    yield {"disagg": disagg, "colocated": colocated, "small": small}
    for r in (disagg, colocated, small):
        r.close()


def make_requests(tag: str, params_for) -> list[GenerationRequest]:
    rng = np.random.default_rng(11)
    return [
        GenerationRequest(f"{tag}{i}", tuple(int(t) for t in rng.integers(0, TINY_GQA.vocab_size, n)), params_for(i))
        for i, n in enumerate(LENGTHS)
    ]


def assert_no_leaks(ray, handles) -> None:
    for name, h in handles.items():
        load = ray.get(h.load.remote())
        assert load.free_pages + load.cached_pages == load.total_pages, (name, load)
        assert load.sequences == 0, (name, load)


def tokens(events: list[TokenEvent] | RouterError) -> list[int]:
    assert all(isinstance(e, TokenEvent) for e in events), events
    assert events[-1].finish_reason is not None
    return [e.token_id for e in events]


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_disaggregated_matches_colocated(cluster, routers, mode):
    ray, h = cluster
    sampled = {"temperature": 0.9, "top_p": 0.95, "top_k": 50} if mode == "seeded" else {"temperature": 0}

    def params(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=8, ignore_eos=True, seed=100 + i, **sampled)

    reqs_d, reqs_c = make_requests(f"d-{mode}-", params), make_requests(f"c-{mode}-", params)
    with cf.ThreadPoolExecutor(8) as ex:
        got_d = list(ex.map(lambda r: run(routers["disagg"], r), reqs_d))
        got_c = list(ex.map(lambda r: run(routers["colocated"], r), reqs_c))
    assert [tokens(e) for e in got_d] == [tokens(e) for e in got_c]
    assert all(len(tokens(e)) == 8 for e in got_d)
    # continuous batching: requests arriving while others decode joined the running batch
    assert ray.get(h["decode"].load.remote()).max_batch_seen > 1
    assert ray.get(h["colocated"].load.remote()).max_batch_seen > 1
    assert_no_leaks(ray, h)


def test_cancel_mid_decode(cluster, routers):
    ray, h = cluster
    router = routers["disagg"]
    req = GenerationRequest(
        "cancel-mid", (1, 2, 3, 4, 5), SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    )
    seen = threading.Event()
    count = [0]

    def on_event(_):
        count[0] += 1
        if count[0] == 3:
            seen.set()

    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(run, router, req, on_event)
        assert seen.wait(60)
        router.cancel(req.request_id)  # what a front does when its client goes away
        outcome = fut.result(60)
    assert isinstance(outcome, RouterError) and outcome.kind is ErrorKind.CANCELLED
    assert 3 <= count[0] < 200
    assert_no_leaks(ray, h)


def test_cancel_before_kv_arrives(cluster):
    """The decode worker's reservation is cancelled before the prefill worker pushes: the push is refused (the
    protocol-level race a router cancel can produce), and nothing leaks on either worker."""
    ray, h = cluster
    decode, prefill = RayDecodeClient(ray, h["decode"], "d"), RayPrefillClient(ray, h["prefill"], "p")
    req = GenerationRequest("cancel-early", tuple(range(1, 30)), SamplingParams(max_tokens=5, temperature=0))
    events = decode.reserve(req)
    assert next(events).ok
    assert decode.cancel(req.request_id)
    assert isinstance(end := next(events), RequestError) and end.kind is ErrorKind.CANCELLED
    *_, result = prefill.prefill_stream(req, decode.describe().kv_address)
    assert not result.ok and result.error.kind is ErrorKind.TRANSFER_FAILED
    assert "no reservation" in result.error.message
    assert_no_leaks(ray, h)


def test_transfer_failure_is_reported(cluster):
    ray, h = cluster
    prefill = RayPrefillClient(ray, h["prefill"], "p")
    req = GenerationRequest("no-receiver", (7, 8, 9), SamplingParams(max_tokens=5, temperature=0))
    *_, result = prefill.prefill_stream(req, "127.0.0.1:9")  # nothing listens there
    assert not result.ok and result.error.kind is ErrorKind.TRANSFER_FAILED
    assert result.first is not None  # the first token was still sampled (and reported) before the transfer
    assert_no_leaks(ray, h)


def test_request_that_never_fits_is_invalid_and_others_finish(cluster, routers):
    ray, h = cluster
    big = GenerationRequest("too-big", tuple(range(1, 81)), SamplingParams(max_tokens=8, temperature=0))
    failed = run(routers["small"], big)
    assert isinstance(failed, RouterError) and failed.kind is ErrorKind.INVALID, failed
    ok = GenerationRequest("fits", (1, 2, 3), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(tokens(run(routers["small"], ok))) == 4
    assert_no_leaks(ray, h)


def test_pages_taken_gives_busy_until_they_are_free(cluster):
    ray, h = cluster
    small = RayDecodeClient(ray, h["small_decode"], "s")
    params = SamplingParams(max_tokens=8, temperature=0)
    hog = GenerationRequest("hog", tuple(range(1, 41)), params)  # 48 tokens reserved: 3 of the 4 pages
    assert next(small.reserve(hog)).ok
    second = next(small.reserve(GenerationRequest("second", tuple(range(1, 30)), params)))
    assert second.kind is ErrorKind.BUSY and "exhausted" in second.reason
    duplicate = next(small.reserve(hog))
    assert duplicate.kind is ErrorKind.INVALID and "already" in duplicate.reason
    assert small.cancel("hog")
    assert next(small.reserve(GenerationRequest("second", tuple(range(1, 30)), params))).ok
    assert small.cancel("second")
    assert_no_leaks(ray, h)


def test_pages_run_out_mid_generation_evicts_with_an_explicit_error(cluster, routers):
    """Two sequences fit at admission (prompt + 4-token slice) but not as they grow: the later one is evicted
    with EVICTED (this router does not migrate: the outcome names it), the earlier one finishes, and every page
    comes back."""
    ray, h = cluster
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    reqs = [GenerationRequest(f"grow{i}", tuple(range(1 + i, 21 + i)), params) for i in range(2)]
    with cf.ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda r: run(routers["small"], r), reqs))
    failed = [r for r in results if isinstance(r, RouterError)]
    assert len(failed) == 1 and "evicted" in failed[0].message, results
    assert any(isinstance(r, list) and len(tokens(r)) == 40 for r in results), results
    assert_no_leaks(ray, h)


def test_everything_listens_on_loopback_only(cluster):
    assert listeners_beyond_loopback() == []
