"""Speculative decoding: prompt-lookup drafts and the acceptance rule (pure, with real decoders and chosen logits),
`batch_verify` with multi-token drafts across several sequences against the float64 reference, and the decode
engine with `speculative=ngram` against `off`: the same tokens (greedy and seeded), the cache rolled back, the
pages accounted, stop ids and `max_tokens` inside an accepted run."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_GQA
from reference import NumpyLlama
from test_engines import (
    assert_greedy_matches_reference,
    assert_no_leaks,
    drain,
    engine_options,
    new_runtime,
    params,  # noqa: F401 (fixture)
    run_until,
    submit,
)

from decode_worker.engine import DecodeEngine
from engine.messages import GenerationRequest
from engine.speculation import NgramDrafter, SpecMode, accept
from llama_relax.generation import FinishReason, SequenceDecoder, TokenEvent
from llama_relax.sampling import SamplingParams

V = 50


def rows_choosing(*tokens: int) -> np.ndarray:
    """Logits rows whose greedy choice is each of `tokens` in turn: [len(tokens), V]."""
    rows = np.zeros((len(tokens), V), dtype=np.float32)
    for i, t in enumerate(tokens):
        rows[i, t] = 5.0
    return rows


def decoder(max_tokens: int = 100, stop_ids: tuple[int, ...] = ()) -> SequenceDecoder:
    p = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=stop_ids, ignore_eos=True)
    return SequenceDecoder(p, None, prompt_len=4, context_window=1000)


# ---- drafting --------------------------------------------------------------------------------------------------
def test_the_draft_follows_the_latest_earlier_occurrence_of_the_longest_suffix():
    d = NgramDrafter(max_n=3, min_n=2)
    d.sync([1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3], [])
    assert d.propose(3) == [4, 9, 2]  # "1 2 3" occurred before (followed by 4): the longest match wins over "2 3"
    short = NgramDrafter(max_n=3, min_n=2)
    short.sync([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3], [])
    assert short.propose(3) == [5, 6, 7]  # only "2 3" matches: its latest earlier occurrence (followed by 5)
    d2 = NgramDrafter(max_n=3, min_n=2)
    d2.sync([7, 1, 2, 3, 4, 8, 8, 1, 2, 3], [])
    assert d2.propose(2) == [4, 8]  # the longest n-gram "1 2 3"
    assert d2.propose(50) == [4, 8, 8, 1, 2, 3]  # up to the end of what exists
    assert NgramDrafter().propose(4) == [] and d2.propose(0) == []
    none = NgramDrafter(max_n=3, min_n=2)
    none.sync([1, 2, 3, 4, 5], [])
    assert none.propose(4) == []  # nothing repeats


def test_sync_takes_in_the_prompt_then_the_output_as_they_grow():
    d = NgramDrafter(max_n=2, min_n=2)
    out: list[int] = []
    d.sync([5, 6, 7], out)
    out += [5, 6]
    d.sync([5, 6, 7], out)
    assert d.tokens == [5, 6, 7, 5, 6] and d.propose(3) == [7, 5, 6]
    d.sync([5, 6, 7], out)  # nothing new: nothing changes
    assert d.tokens == [5, 6, 7, 5, 6]


# ---- acceptance --------------------------------------------------------------------------------------------------
def test_every_draft_token_accepted_gives_the_draft_plus_one():
    dec = decoder()
    v = accept(dec, rows_choosing(7, 8, 9, 10), [7, 8, 9])
    assert [e.token_id for e in v.events] == [7, 8, 9, 10] and (v.kept, v.accepted) == (4, 3)
    assert dec.output_ids == [7, 8, 9, 10]


def test_no_draft_token_accepted_gives_one_token_and_keeps_one_input():
    dec = decoder()
    v = accept(dec, rows_choosing(3, 8, 9), [7, 8])
    assert [e.token_id for e in v.events] == [3] and (v.kept, v.accepted) == (1, 0)


def test_a_partial_run_stops_at_the_first_mismatch():
    dec = decoder()
    v = accept(dec, rows_choosing(7, 8, 4, 10, 11), [7, 8, 9, 10])
    assert [e.token_id for e in v.events] == [7, 8, 4] and (v.kept, v.accepted) == (3, 2)


def test_a_stop_id_or_max_tokens_inside_an_accepted_run_ends_it_there():
    v = accept(decoder(stop_ids=(8,)), rows_choosing(7, 8, 9, 10), [7, 8, 9])
    assert [e.token_id for e in v.events] == [7, 8] and v.events[-1].finish_reason is FinishReason.STOP
    assert v.kept == 2  # inputs [last, 7]: the 8 that ended it is not fed back
    v = accept(decoder(max_tokens=2), rows_choosing(7, 8, 9, 10), [7, 8, 9])
    assert [e.token_id for e in v.events] == [7, 8] and v.events[-1].finish_reason is FinishReason.LENGTH
    with pytest.raises(ValueError, match="rows"):
        accept(decoder(), rows_choosing(1, 2), [1, 2])


# ---- the model ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtimes(compiled_gqa, params):  # noqa: F811
    rts = [new_runtime(compiled_gqa, params) for _ in range(2)]
    yield rts
    for rt in rts:
        rt.close()


def test_batch_verify_with_multi_token_drafts_across_sequences_matches_the_reference(runtimes, params):  # noqa: F811
    rt = runtimes[0]
    ref = NumpyLlama(TINY_GQA, params)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]
    drafts = [[2, 6, 5], [3], [3, 2, 3, 8]]  # 4, 2 and 5 tokens fed, with the last prompt token's successor first
    for i, p in enumerate(prompts):
        rt.add_sequence(i)
        rt.prefill([i], [p])
    rows = rt.verify([0, 1, 2], [[p[-1] + 1, *d] for p, d in zip(prompts, drafts, strict=True)])
    for i, (p, d) in enumerate(zip(prompts, drafts, strict=True)):
        want = ref.forward(i, [*p, p[-1] + 1, *d])[len(p) :]  # [len(d) + 1, V]
        assert rows[i].shape == want.shape
        np.testing.assert_allclose(rows[i], want, atol=2e-3, rtol=2e-3)
    for i, d in enumerate(drafts):  # roll the drafts back: the cache holds the prompts (+ one token) again
        rt.popn(i, len(d))
        assert rt.sequence_length(i) == len(prompts[i]) + 1 == rt.kv_length_in_cache(i)
        rt.remove_sequence(i)


REPEATING = [
    (11, 12, 13, 14, 11, 12, 13, 14, 11, 12),  # drafts from the start
    (20, 21, 22, 20, 21, 23, 24, 20, 21),
    (5, 6, 7, 8, 9, 10, 30, 31, 5, 6, 7),
]


def run_engine(
    rt, mode: SpecMode, sampling: SamplingParams, max_batch: int = 8
) -> tuple[list[list[int]], DecodeEngine]:
    eng = DecodeEngine(rt, None, engine_options(max_batch_size=max_batch, speculative=mode), name="colocated")
    streams = []
    for i, p in enumerate(REPEATING):
        admission, stream = submit(eng, GenerationRequest(f"s{i}", p, sampling))
        assert admission.ok
        streams.append(stream)
    run_until(eng, lambda: not eng.seqs)
    out = []
    for stream in streams:
        events = drain(stream)
        assert all(isinstance(e, TokenEvent) for e in events), events[-1]
        out.append([e.token_id for e in events])
    return out, eng


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_speculation_streams_the_same_tokens_as_plain_decoding(runtimes, params, sampling):  # noqa: F811
    plain, off = run_engine(runtimes[0], SpecMode.OFF, sampling)
    spec, on = run_engine(runtimes[1], SpecMode.NGRAM, sampling)
    assert spec == plain and all(len(t) == 40 for t in spec)
    if sampling.greedy:
        for p, tokens in zip(REPEATING, spec, strict=True):
            assert_greedy_matches_reference(params, p, tokens)
    load = on.load()
    assert load.spec_draft_tokens > 0 and 0 <= load.spec_accepted_tokens <= load.spec_draft_tokens
    assert off.load().spec_draft_tokens == 0
    assert_no_leaks(off, on)


def test_max_tokens_and_a_stop_id_inside_a_speculative_run(runtimes):
    """Whatever the draft, a request ends at its `max_tokens` or stop id exactly as without speculation."""
    for sampling in (
        SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(12, 21, 7), ignore_eos=True),
    ):
        plain, off = run_engine(runtimes[0], SpecMode.OFF, sampling)
        spec, on = run_engine(runtimes[1], SpecMode.NGRAM, sampling, max_batch=2)  # a batch that queues
        assert spec == plain
        assert_no_leaks(off, on)
