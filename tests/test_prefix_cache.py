"""The prefix cache on real tiny compiled runtimes, engines stepped on the test's thread: reusing a cached prefix
(whole pages shared through TVM's sequence forking, an in-page tail copied) never changes the output; the decode
side answers how many tokens it holds and only the rest of the KV is sent; LRU eviction under page pressure never
takes a page a running sequence uses; every test ends with the leak check (pages free or the cache's, and the
real KV cache's free-page count agreeing with the engine's accounting)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import TINY_GQA
from reference import random_params
from test_engines import (
    Collect,
    RecordingSender,
    assert_no_leaks,
    drain,
    engine_options,
    new_runtime,
    reserve,
    run_until,
    submit,
)

from decode_worker.engine import DecodeEngine
from engine.messages import GenerationRequest
from engine.prefix_cache import page_hashes
from llama_relax.generation import TokenEvent
from llama_relax.runtime import KVCacheConfig, ModelRuntime
from llama_relax.sampling import SamplingParams
from prefill_worker.engine import PrefillEngine

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def params():
    return random_params(TINY_GQA, seed=23)


@pytest.fixture
def runtimes(compiled_gqa, params):
    rts = [new_runtime(compiled_gqa, params) for _ in range(3)]
    yield rts
    for rt in rts:
        rt.close()


def ids(n: int, seed: int) -> tuple[int, ...]:
    return tuple(int(t) for t in np.random.default_rng(seed).integers(0, TINY_GQA.vocab_size, n))


def generate(eng: DecodeEngine, req: GenerationRequest) -> tuple[list[int], int]:
    """(tokens, cached_tokens) of one request run to the end on a colocated engine."""
    admission, stream = submit(eng, req)
    assert admission.ok, admission
    run_until(eng, lambda: req.request_id not in eng.seqs)
    events = drain(stream)
    assert all(isinstance(e, TokenEvent) for e in events), events[-1]
    return [e.token_id for e in events], admission.cached_tokens


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_conversation_reuses_its_cached_turns_and_the_tokens_do_not_change(runtimes, sampling):
    cached = DecodeEngine(runtimes[0], None, engine_options(max_batch_size=8), name="colocated")
    plain = DecodeEngine(runtimes[1], None, engine_options(max_batch_size=8, prefix_cache=False), name="colocated")
    system = ids(40, 1)  # 2.5 pages: the third page is shared in part (copied on fork)
    history: tuple[int, ...] = system
    for turn in range(3):
        prompt = history + ids(13 + 7 * turn, 10 + turn)
        got, hit = generate(cached, GenerationRequest(f"t{turn}", prompt, sampling))
        want, none = generate(plain, GenerationRequest(f"t{turn}", prompt, sampling))
        assert got == want and none == 0
        # turn 0 finds nothing; later turns find the previous prompt and its answer but the last sampled token
        assert hit == (0 if turn == 0 else len(history) - 1)
        history = prompt + tuple(got)
    load = cached.load()
    assert load.prefix_hit_tokens > 0 and load.prefix_queried_tokens > load.prefix_hit_tokens
    assert plain.load().prefix_hit_tokens == 0 and plain.load().cached_pages == 0
    assert load.cached_pages > 0 and set(page_hashes(history[:32])) <= set(load.cached_prefixes)
    assert_no_leaks(cached, plain)


@pytest.mark.parametrize("shared", [32, 37, 1], ids=["page-boundary", "in-page", "one-token"])
def test_prompts_that_share_a_prefix_get_the_uncached_tokens(runtimes, shared):
    cached = DecodeEngine(runtimes[0], None, engine_options(max_batch_size=8), name="colocated")
    plain = DecodeEngine(runtimes[1], None, engine_options(max_batch_size=8, prefix_cache=False), name="colocated")
    base = ids(60, 3)
    generate(cached, GenerationRequest("warm", base, GREEDY))
    prompt = base[:shared] + ids(20, 4)
    got, hit = generate(cached, GenerationRequest("b", prompt, GREEDY))
    assert hit == shared
    assert got == generate(plain, GenerationRequest("b", prompt, GREEDY))[0]
    again, hit = generate(cached, GenerationRequest("c", prompt, GREEDY))  # the whole prompt but its last token
    assert hit == len(prompt) - 1 and again == got
    assert_no_leaks(cached, plain)


def test_the_decode_side_holds_a_prefix_and_only_the_rest_of_the_kv_is_sent(runtimes):
    """P and D both cached: D's reservation answers M cached tokens, P prefills only what its own cache lacks and
    sends tokens [M, n); the tokens equal an uncached colocated run."""
    sender = RecordingSender()
    p = PrefillEngine(runtimes[0], None, sender, engine_options(max_batch_size=8), transfer_threads=1)
    d = DecodeEngine(runtimes[1], None, engine_options(max_batch_size=8))
    plain = DecodeEngine(runtimes[2], None, engine_options(max_batch_size=8, prefix_cache=False), name="colocated")
    system = ids(48, 5)
    sizes = []
    for turn, user in enumerate([ids(20, 6), ids(25, 7)]):
        req = GenerationRequest(f"r{turn}", system + user, GREEDY)
        sent_before = len(sender.payloads)
        admission, stream = d.reserve(req)
        assert admission.ok and admission.cached_tokens == (0 if turn == 0 else 48)
        out = Collect()
        assert p.submit(req, "unused:1", out, kv_begin=admission.cached_tokens).ok
        run_until(p, lambda out=out: out.done.is_set() and not p.jobs)  # released: its prompt is cached
        result = out.items[-1]
        assert result.ok and result.cached_tokens == (0 if turn == 0 else 48)
        pieces = sender.payloads[sent_before:]  # streamed per prefill chunk, tiling [cached, n)
        ranges = [(x.header.begin, x.header.end) for x in pieces]
        assert ranges[0][0] == admission.cached_tokens and ranges[-1][1] == len(req.token_ids)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        sizes.append(sum(x.header.num_tokens for x in pieces))
        for x in pieces:
            d.import_kv(x.header, x.k, x.v)
        run_until(d, lambda rid=req.request_id: rid not in d.seqs)
        got = [out.items[0].token_id] + [e.token_id for e in stream]
        assert got == generate(plain, GenerationRequest(f"r{turn}", req.token_ids, GREEDY))[0]
    assert sizes[1] < sizes[0]  # fewer tokens' KV the second time
    run_until(p, lambda: not p.jobs)
    assert_no_leaks(p, d, plain)


def test_local_prefill_and_a_migrated_request_start_from_the_cached_prefix(runtimes):
    d = DecodeEngine(runtimes[0], None, engine_options(max_batch_size=8))
    plain = DecodeEngine(runtimes[1], None, engine_options(max_batch_size=8, prefix_cache=False), name="colocated")
    prompt = ids(50, 8)
    want, _ = generate(plain, GenerationRequest("full", prompt, GREEDY))
    # a reservation prefilled here (as the router does for a short uncached part) fills the cache
    first = GenerationRequest("a", prompt, GREEDY)
    stream = reserve(d, first)
    assert d.prefill_local("a").ok
    run_until(d, lambda: "a" not in d.seqs)
    assert [e.token_id for e in drain(stream)] == want
    # the migrated attempt (prompt + 3 tokens already streamed) finds the prompt and those tokens cached
    resumed = GenerationRequest("a~1", prompt, GREEDY, tuple(want[:3]))
    admission, stream = d.reserve(resumed)
    assert admission.cached_tokens == len(resumed.token_ids) - 1
    assert d.prefill_local("a~1").ok
    run_until(d, lambda: "a~1" not in d.seqs)
    assert [e.token_id for e in drain(stream)] == want[3:]
    assert_no_leaks(d, plain)


def test_eviction_frees_idle_entries_lru_and_never_a_page_a_running_sequence_uses(compiled_gqa, params):
    """A 12-page cache: finished prompts fill it; a new request evicts the least recently used idle entries,
    and an entry a running request was forked from survives a full flush."""
    rt = ModelRuntime(
        compiled_gqa, params, KVCacheConfig(max_batch_size=4, max_total_seq_len=192, prefill_chunk_size=32)
    )
    plain_rt = new_runtime(compiled_gqa, params)
    try:
        eng = DecodeEngine(rt, None, engine_options(max_batch_size=4, output_slice=8), name="colocated")
        plain = DecodeEngine(plain_rt, None, engine_options(max_batch_size=4, prefix_cache=False), name="colocated")
        short = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        warm = [ids(40, 20 + i) for i in range(3)]  # 3 pages each once finished
        for i, w in enumerate(warm):
            generate(eng, GenerationRequest(f"w{i}", w, short))
        assert len(eng.cache.entries) == 3 and eng.pool.free == eng.pool.total - 9
        generate(eng, GenerationRequest("touch", warm[0] + ids(4, 30), short))  # w0 is now the most recent
        big = ids(100, 31)  # 100 + 8 reserved tokens: 7 pages -> the idle LRU entries go first
        got, _ = generate(eng, GenerationRequest("big", big, short))
        assert got == generate(plain, GenerationRequest("big", big, short))[0]
        kept = {e.tokens[:40] for e in eng.cache.entries.values()}
        assert warm[1] not in kept and eng.cache.evicted_entries >= 1
        assert eng.runtime.free_pages() == eng.pool.free
        # a running request holds its entry: a flush takes every other one, never that one
        base = next(iter(eng.cache.entries.values()))
        admission, stream = submit(eng, GenerationRequest("run", base.tokens + ids(5, 32), short))
        assert admission.cached_tokens == len(base.tokens)
        eng.flush_cache()
        assert list(eng.cache.entries.values()) == [base] and base.refs == 1
        run_until(eng, lambda: "run" not in eng.seqs)
        assert [e.token_id for e in drain(stream)] == generate(
            plain, GenerationRequest("run", base.tokens + ids(5, 32), short)
        )[0]
        assert_no_leaks(eng, plain)
    finally:
        rt.close()
        plain_rt.close()


def test_a_cache_that_is_off_keeps_nothing_and_answers_no_hits(runtimes):
    eng = DecodeEngine(runtimes[0], None, engine_options(max_batch_size=8, prefix_cache=False), name="colocated")
    prompt = ids(40, 9)
    generate(eng, GenerationRequest("a", prompt, GREEDY))
    _, hit = generate(eng, GenerationRequest("b", prompt, GREEDY))
    assert hit == 0 and not eng.cache.entries and eng.pool.free == eng.pool.total
    assert eng.load().prefix_queried_tokens == 0
    assert_no_leaks(eng)
