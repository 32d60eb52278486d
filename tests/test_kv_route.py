"""`kvtransfer.route` (#28), fast: the route text a decode worker publishes, which layers go to which endpoint for
any pair of stage splits, the parts an endpoint holds until the commit, and the manifest header."""

from __future__ import annotations

import numpy as np
import pytest

from kvtransfer.payload import ErrorCode, KVHeader, PayloadError, expect_shape, make_manifest, make_payload
from kvtransfer.route import Endpoint, KVParts, KVRoute, combine
from kvtransfer.transport import TransferResult

FP = "fp"


def test_route_text_round_trips_and_a_plain_address_is_a_route():
    r = KVRoute("h:1", (Endpoint("h:2", 0, 19), Endpoint("h:3", 19, 11)))
    assert r.encode() == "h:1|h:2@0+19|h:3@19+11" and KVRoute.parse(r.encode()) == r
    assert KVRoute.parse("nccl://h:9") == KVRoute("nccl://h:9")
    assert KVRoute.parse("h:1").receivers(30) == (Endpoint("h:1", 0, 30),)


@pytest.mark.parametrize(
    "text", ["", "|h:2@0+3", "h:1|h:2@0", "h:1|h:2@x+3", "h:1|@0+3", "h:1|h:2@0+0", "h:1|h:2@1+3", "h:1|a@0+2|b@3+2"]
)
def test_bad_route_text_names_the_field(text):
    with pytest.raises(ValueError, match="kv_target"):
        KVRoute.parse(text)


def test_a_route_for_another_layer_count_is_refused():
    with pytest.raises(ValueError, match="the model 30"):
        KVRoute.parse("h:1|a@0+19|b@19+10").receivers(30)


def _ranges(split: list[int]) -> list[range]:
    out, at = [], 0
    for n in split:
        out.append(range(at, at + n))
        at += n
    return out


@pytest.mark.parametrize(
    ("senders", "receivers"), [([30], [19, 11]), ([19, 11], [30]), ([13, 13, 4], [19, 11]), ([19, 11], [19, 11])]
)
def test_every_layer_goes_to_exactly_one_endpoint_from_exactly_one_sender(senders, receivers):
    ends = tuple(Endpoint(f"d{i}", r.start, len(r)) for i, r in enumerate(_ranges(receivers)))
    route = KVRoute("c", ends if len(receivers) > 1 else ())
    got: dict[str, list[int]] = {}
    for held in _ranges(senders):
        for e, shared in route.overlaps(held, 30):
            assert shared.start >= held.start and shared.stop <= held.stop
            assert shared.start >= e.first_layer and shared.stop <= e.layers.stop
            got.setdefault(e.address, []).extend(shared)
    want = {e.address: list(e.layers) for e in route.receivers(30)}
    assert {a: sorted(ls) for a, ls in got.items()} == want


def _part(first: int, layers: int, begin: int = 0, n: int = 4, rid: str = "r", seed: int = 0):
    rng = np.random.default_rng(seed)
    k, v = (rng.standard_normal((layers, n, 2, 8)).astype(np.float16) for _ in range(2))
    return make_payload(k, v, FP, begin, rid, page_size=16, first_layer=first)


def test_parts_tile_the_layers_before_a_take_and_a_resent_part_replaces_its_copy():
    parts = KVParts(range(3, 10), 1 << 20, 60.0)
    a, b, b2 = _part(3, 4, seed=1), _part(7, 3, seed=2), _part(7, 3, seed=3)
    parts.add(a.header, a.k, a.v)
    with pytest.raises(PayloadError) as e:
        parts.check("r", 0, 4)
    assert e.value.code is ErrorCode.TRUNCATED and "missing from layer 7" in e.value.message
    parts.add(b.header, b.k, b.v)
    parts.add(b2.header, b2.k, b2.v)  # the same layers again (a retried part)
    parts.check("r", 0, 4)
    k, v = parts.take("r", 0, 4)
    assert k.shape == (7, 4, 2, 8) and k.tobytes() == np.concatenate([a.k, b2.k]).tobytes()
    assert v.tobytes() == np.concatenate([a.v, b2.v]).tobytes()
    assert len(parts) == 0 and parts.nbytes == 0
    with pytest.raises(PayloadError):  # taken once
        parts.take("r", 0, 4)


def test_parts_are_kept_per_token_range_and_dropped_per_request_by_age_and_refused_beyond_the_cap():
    now = [0.0]
    one = _part(0, 2).header.total_bytes
    parts = KVParts(range(0, 2), 3 * one, 10.0, clock=lambda: now[0])
    for p in (_part(0, 2, 0), _part(0, 2, 4), _part(0, 2, 0, rid="s")):
        parts.add(p.header, p.k, p.v)
    assert len(parts) == 3
    extra = _part(0, 2, 8)
    with pytest.raises(PayloadError) as e:
        parts.add(extra.header, extra.k, extra.v)
    assert e.value.code is ErrorCode.BUSY
    assert parts.drop("r") == 2 and len(parts) == 1
    now[0] = 11.0  # the other request's part is too old: dropped at the next add
    parts.add(extra.header, extra.k, extra.v)
    assert len(parts) == 1
    parts.check("r", 8, 12)


def test_a_manifest_has_no_layers_and_only_a_receiver_that_gets_parts_takes_one():
    m = make_manifest(FP, "float16", 2, 8, 16, 32, 64, "r", b"meta")
    h = KVHeader.from_bytes(m.header.to_bytes())
    assert h.is_manifest and h.total_bytes == 0 and h.num_chunks == 0 and (h.begin, h.end, h.meta) == (32, 64, b"meta")
    whole = expect_shape(30, 2, 8, 16, 256)
    assert "manifest" in whole(h)
    assert expect_shape(30, 2, 8, 16, 256, parts=True, manifests=True)(h) is None
    stage = expect_shape(11, 2, 8, 16, 256, first_layer=19, parts=True)
    assert stage(_part(19, 11).header) is None and stage(_part(22, 3).header) is None
    assert "not a part of" in stage(_part(18, 3).header) and "manifest" in stage(h)
    assert "not exactly" in whole(_part(0, 3).header)


def test_results_of_parts_combine_into_the_first_failure():
    ok = TransferResult(True, None, "", 10, 0.5, 0.1)
    bad = TransferResult.failure(ErrorCode.BUSY, "full", 4, 0.2)
    c = combine([ok, bad, ok])
    assert not c.ok and c.error is ErrorCode.BUSY and c.nbytes == 24 and c.transfer_s == 0.5
    assert combine([ok, ok]).ok
