"""Prefix caching through `pdserve serve` (real Ray on loopback, real gRPC, the tiny model): a conversation's
later turns reuse what the workers cached, the usage and the KV bytes say so, the router keeps a conversation on
the decode worker that holds it, a short uncached part is prefilled by the decode worker itself, and the tokens
equal a server with `--no-prefix-cache`. Every test ends with the leak check (free + cached == total)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_GQA
from model_files import write_hf_dir
from reference import random_params
from serving import Server, assert_clean_exit, collect, request, scrape_metric, tokens_of, wait_until

from kvtransfer.net import free_port


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, compiled_gqa):
    return write_hf_dir(tmp_path_factory.mktemp("prefix-model"), TINY_GQA, random_params(TINY_GQA, seed=12))


def start(model_dir, cache_dir, *flags: str) -> Server:
    port = free_port()
    s = Server(
        ["--model", str(model_dir), "--max-total-seq-len", "2048", "--metrics-port", str(port), *flags], cache_dir
    )
    s.metrics_port = port
    return s


@pytest.fixture(scope="module")
def cached(model_dir, cache_dir):
    s = start(model_dir, cache_dir, "--decode-workers", "2")
    yield s
    assert_clean_exit(s)


@pytest.fixture(scope="module")
def baseline(model_dir, cache_dir):
    s = start(model_dir, cache_dir, "--no-prefix-cache")
    yield s
    assert_clean_exit(s)


def metric(s: Server, name: str, label: str = "") -> float:
    return scrape_metric(s.metrics_port, name, label)


def ids(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, TINY_GQA.vocab_size, n)]


def converse(s: Server, system: list[int], users: list[list[int]], max_tokens: int = 6):
    """Each turn after the previous answer; (tokens, final response) per turn."""
    history, out = list(system), []
    for user in users:
        prompt = history + user
        responses = collect(s.stub, request(prompt, max_tokens=max_tokens))
        out.append((tokens_of(responses), responses[-1]))
        history = prompt + tokens_of(responses)
    return out


def test_later_turns_reuse_the_cache_stay_on_their_decode_worker_and_match_the_baseline(cached, baseline):
    system = ids(64, 1)  # + 90 + 6 + 12 + 6 + 70 + 6 = 254 tokens: the tiny model's context window is 256
    conversations = [[ids(90, 10 + c), ids(12, 20 + c), ids(70, 30 + c)] for c in range(3)]
    for c, users in enumerate(conversations):
        got = converse(cached, system, users)
        want = converse(baseline, system, users)
        assert [t for t, _ in got] == [t for t, _ in want]
        (_, t0), (_, t1), (_, t2) = got
        assert all(r.usage.cached_prompt_tokens == 0 for _, r in want)
        assert t0.usage.cached_prompt_tokens == (0 if c == 0 else 64)  # the system prompt, from turn 0 on
        # turn 1: 12 new tokens + the last answer token are left: the decode worker holding turn 0 prefills them
        assert t1.usage.cached_prompt_tokens == t1.usage.prompt_tokens - 13 and t1.timings.kv_transfer_bytes == 0
        # turn 2: 70 new tokens go through the prefill worker; only the KV the decode worker lacks is sent
        assert 0 < t2.timings.kv_transfer_bytes < want[2][1].timings.kv_transfer_bytes / 3
    assert metric(cached, "pdserve_local_prefills_total") == 3  # every turn 1 found its conversation's worker
    # the workers' counters reach the metrics with a later load poll
    wait_until(lambda: metric(cached, "pdserve_prefix_cache_hit_tokens_total", 'role="decode"') > 0)
    wait_until(lambda: metric(cached, "pdserve_prefix_cache_hit_tokens_total", 'role="prefill"') > 0)
    queried = metric(cached, "pdserve_prefix_cache_queried_tokens_total")
    assert queried > metric(cached, "pdserve_prefix_cache_hit_tokens_total") > 0
    assert metric(baseline, "pdserve_prefix_cache_queried_tokens_total") == 0
    assert metric(cached, "pdserve_kv_transfer_bytes_total") < metric(baseline, "pdserve_kv_transfer_bytes_total") / 2
    assert cached.pages_all_free() and baseline.pages_all_free()
    assert sum(w.cached_pages for w in cached.workers()) > 0
    assert all(w.cached_pages == 0 and w.free_pages == w.total_pages for w in baseline.workers())


def test_seeded_sampling_is_the_same_with_and_without_the_cache(cached, baseline):
    prompt = ids(60, 40)
    sampled = dict(max_tokens=10, temperature=0.8, top_p=0.9, seed=5)
    runs = [tokens_of(collect(s.stub, request(prompt, **sampled))) for s in (cached, cached, baseline)]
    assert runs[0] == runs[1] == runs[2]
    assert cached.pages_all_free()
