"""Prefill worker + decode worker as Ray actors on a loopback cluster (KV over real gRPC) against the colocated
engine, with the real tiny compiled model: identical greedy and seeded outputs, continuous batching, and clean
outcomes with no leaked pages for cancels, transfer failures and exhausted pages."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import numpy as np
import pytest
from conftest import TINY_GQA
from model_files import write_hf_dir
from ray_cluster import listeners_beyond_loopback, local_ray
from reference import random_params

from engine.messages import ErrorKind, GenerationRequest, PrefillResult, RequestError, WorkerOptions
from llama_relax.generation import TokenEvent
from llama_relax.sampling import SamplingParams

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


def disagg(ray, prefill, decode, req: GenerationRequest, on_event=None) -> list[TokenEvent | RequestError]:
    """What the router does for one request: reserve on D, prefill on P (first token, sent to D with the KV),
    stream the rest from D."""
    admission = ray.get(decode.reserve.remote(req))
    if not admission.ok:
        return [admission.error(req.request_id)]
    kv_address = ray.get(decode.describe.remote()).kv_address
    items = [ray.get(ref) for ref in prefill.prefill_stream.remote(req, kv_address, admission.cached_tokens)]
    result: PrefillResult = items[-1]
    if not result.ok:
        ray.get(decode.cancel.remote(req.request_id))
        return [result.error]
    first = result.first
    if first.finish_reason is not None:
        ray.get(decode.cancel.remote(req.request_id))
        return [first]
    out: list[TokenEvent | RequestError] = [first]
    for ref in decode.stream.remote(req.request_id):
        out.append(ray.get(ref))
        if on_event is not None:
            on_event(out[-1])
    return out


def colocated(ray, worker, req: GenerationRequest) -> list[TokenEvent | RequestError]:
    return [ray.get(ref) for ref in worker.generate.remote(req)]


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


def tokens(events) -> list[int]:
    assert all(isinstance(e, TokenEvent) for e in events), events
    assert events[-1].finish_reason is not None
    return [e.token_id for e in events]


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_disaggregated_matches_colocated(cluster, mode):
    ray, h = cluster
    sampled = {"temperature": 0.9, "top_p": 0.95, "top_k": 50} if mode == "seeded" else {"temperature": 0}

    def params(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=8, ignore_eos=True, seed=100 + i, **sampled)

    reqs_d, reqs_c = make_requests(f"d-{mode}-", params), make_requests(f"c-{mode}-", params)
    with cf.ThreadPoolExecutor(8) as ex:
        got_d = list(ex.map(lambda r: disagg(ray, h["prefill"], h["decode"], r), reqs_d))
        got_c = list(ex.map(lambda r: colocated(ray, h["colocated"], r), reqs_c))
    assert [tokens(e) for e in got_d] == [tokens(e) for e in got_c]
    assert all(len(tokens(e)) == 8 for e in got_d)
    # continuous batching: requests arriving while others decode joined the running batch
    assert ray.get(h["decode"].load.remote()).max_batch_seen > 1
    assert ray.get(h["colocated"].load.remote()).max_batch_seen > 1
    assert_no_leaks(ray, h)


def test_cancel_mid_decode(cluster):
    ray, h = cluster
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
        fut = ex.submit(disagg, ray, h["prefill"], h["decode"], req, on_event)
        assert seen.wait(60)
        assert ray.get(h["decode"].cancel.remote(req.request_id))
        events = fut.result(60)
    assert isinstance(events[-1], RequestError) and events[-1].kind is ErrorKind.CANCELLED
    assert 3 < len(events) < 200
    assert_no_leaks(ray, h)


def test_cancel_before_kv_arrives(cluster):
    ray, h = cluster
    req = GenerationRequest("cancel-early", tuple(range(1, 30)), SamplingParams(max_tokens=5, temperature=0))
    assert ray.get(h["decode"].reserve.remote(req)).ok
    assert ray.get(h["decode"].cancel.remote(req.request_id))
    result = ray.get(h["prefill"].prefill.remote(req, ray.get(h["decode"].describe.remote()).kv_address))
    assert not result.ok and result.error.kind is ErrorKind.TRANSFER_FAILED
    assert "no reservation" in result.error.message
    assert_no_leaks(ray, h)


def test_transfer_failure_is_reported(cluster):
    ray, h = cluster
    req = GenerationRequest("no-receiver", (7, 8, 9), SamplingParams(max_tokens=5, temperature=0))
    result = ray.get(h["prefill"].prefill.remote(req, "127.0.0.1:9"))  # nothing listens there
    assert not result.ok and result.error.kind is ErrorKind.TRANSFER_FAILED
    assert result.first is not None  # the first token was still sampled (and reported) before the transfer
    assert_no_leaks(ray, h)


def test_request_that_never_fits_is_invalid_and_others_finish(cluster):
    ray, h = cluster
    small = h["small_decode"]
    big = GenerationRequest("too-big", tuple(range(1, 81)), SamplingParams(max_tokens=8, temperature=0))
    events = disagg(ray, h["prefill"], small, big)
    assert isinstance(events[0], RequestError) and events[0].kind is ErrorKind.INVALID, events
    ok = GenerationRequest("fits", (1, 2, 3), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(tokens(disagg(ray, h["prefill"], small, ok))) == 4
    assert_no_leaks(ray, h)


def test_pages_taken_gives_busy_until_they_are_free(cluster):
    ray, h = cluster
    small = h["small_decode"]
    params = SamplingParams(max_tokens=8, temperature=0)
    hog = GenerationRequest("hog", tuple(range(1, 41)), params)  # 48 tokens reserved: 3 of the 4 pages
    assert ray.get(small.reserve.remote(hog)).ok
    second = ray.get(small.reserve.remote(GenerationRequest("second", tuple(range(1, 30)), params)))
    assert second.kind is ErrorKind.BUSY and "exhausted" in second.reason
    duplicate = ray.get(small.reserve.remote(hog))
    assert duplicate.kind is ErrorKind.INVALID and "already" in duplicate.reason
    assert ray.get(small.cancel.remote("hog"))
    assert ray.get(small.reserve.remote(GenerationRequest("second", tuple(range(1, 30)), params))).ok
    assert ray.get(small.cancel.remote("second"))
    assert_no_leaks(ray, h)


def test_pages_run_out_mid_generation_evicts_with_an_explicit_error(cluster):
    """Two sequences fit at admission (prompt + 4-token slice) but not as they grow: the later one is evicted
    with EVICTED, the earlier one finishes, and every page comes back."""
    ray, h = cluster
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    reqs = [GenerationRequest(f"grow{i}", tuple(range(1 + i, 21 + i)), params) for i in range(2)]
    with cf.ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda r: disagg(ray, h["prefill"], h["small_decode"], r), reqs))
    ends = [r[-1] for r in results]
    kinds = [e.kind if isinstance(e, RequestError) else e.finish_reason for e in ends]
    assert ErrorKind.EVICTED in kinds, ends
    assert any(isinstance(e, TokenEvent) and len(r) == 40 for e, r in zip(ends, results, strict=True)), ends
    assert_no_leaks(ray, h)


def test_everything_listens_on_loopback_only(cluster):
    assert listeners_beyond_loopback() == []
