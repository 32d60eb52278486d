"""Speculative decoding: prompt-lookup drafts and the acceptance rule (pure, with real decoders and chosen logits),
`batch_verify` with multi-token drafts across several sequences against the float64 reference, and the decode
engine with `speculative=ngram` against `off`: the same tokens (greedy and seeded), the cache rolled back, the
pages accounted, stop ids and `max_tokens` inside an accepted run."""

from __future__ import annotations

import dataclasses

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
from engine.speculation import (
    Acceptance,
    NgramDrafter,
    SpecMode,
    SuffixIndex,
    accept,
    choose_drafts,
    first_rows,
    verify_rounds,
)
from llama_relax.generation import FinishReason, SequenceDecoder, TokenEvent
from llama_relax.sampling import SamplingParams
from llama_relax.spec_cost import StepCost

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


def test_rounds_compute_only_the_rows_acceptance_reads_in_at_most_two_lm_head_calls():
    drafts = [[7, 8, 9], [3, 4], [5]]
    chosen = {0: rows_choosing(7, 8, 9, 10), 1: rows_choosing(3, 1, 2), 2: rows_choosing(6, 6)}
    calls: list[list[tuple[int, int]]] = []

    def logits(pairs):
        calls.append(pairs)
        return np.stack([chosen[i][j] for i, j in pairs])

    streamed: list[tuple[int, int]] = []
    out = verify_rounds(
        [decoder() for _ in drafts], drafts, logits, lambda i, e: streamed.append((i, e.token_id)), first=[2, 1, 1]
    )
    assert [[e.token_id for e in v.events] for v in out] == [[7, 8, 9, 10], [3, 1], [6]]
    assert [(v.kept, v.accepted) for v in out] == [(4, 3), (2, 1), (1, 0)]
    # round 2: the rest of the drafts whose first rows all matched (sequence 2 failed at its row 0)
    assert calls == [[(0, 0), (0, 1), (1, 0), (2, 0)], [(0, 2), (0, 3), (1, 1), (1, 2)]]
    assert streamed[:4] == [(0, 7), (0, 8), (1, 3), (2, 6)]  # each token streamed as soon as it was sampled
    # the last token of each run carries the step's counts; the others none
    assert [(e.drafted, e.accepted) for e in out[0].events] == [(0, 0)] * 3 + [(3, 3)]
    assert (out[1].events[-1].drafted, out[1].events[-1].accepted) == (2, 1)
    assert (out[2].events[-1].drafted, out[2].events[-1].accepted) == (1, 0)


def test_first_rows_follow_the_acceptance_rate():
    assert first_rows(0.5, 8) == 2  # row 0, and row 1 (needed with probability 0.5)
    assert first_rows(0.2, 8) == 1
    assert first_rows(0.95, 8) == 9  # 0.95 ** 8 = 0.66: every row
    assert first_rows(0.95, 3) == 4 and first_rows(0.9, 0) == 1
    a = Acceptance()
    assert a.rate == 0.5
    for _ in range(10):
        a.update(drafted=8, accepted=8, finished=False)
    assert a.rate > 0.95
    for _ in range(30):
        a.update(drafted=4, accepted=0, finished=False)
    assert a.rate < 0.3  # the prior and the decay keep a floor near 1 / 12
    b = Acceptance()
    b.update(drafted=4, accepted=1, finished=True)  # a stop inside the run is not a rejection
    assert b.rejected == 0 and b.accepted == 1


def test_the_suffix_index_drafts_from_recent_outputs_within_its_bound():
    idx = SuffixIndex(max_tokens=12, max_n=3, min_n=2)
    idx.add([1, 2, 3, 4, 5, 6])
    assert idx.propose([9, 9, 2, 3], 3) == [4, 5, 6]
    assert idx.propose([9, 9, 8, 7], 3) == [] and idx.propose([2, 3], 0) == []
    idx.add([10, 11, 12, 13, 14, 15])
    idx.add([20, 2, 3, 30, 31])  # 17 tokens > 12: the first output is dropped, with its n-grams
    assert idx.tokens <= 12
    assert idx.propose([2, 3], 4) == [30, 31]  # the newest occurrence
    assert idx.propose([4, 5], 2) == []  # only in the dropped output
    assert idx.propose([11, 12], 2) == [13, 14]
    assert all(doc >= idx._docs[0][0] for doc, _ in idx._next.values())  # nothing points at dropped text


def _cost(decode_ms: float, fwd_ms: dict[int, float], head_ms: float) -> StepCost:
    """A one-batch-size curve: decode, the verify forward by draft length, the LM head per row."""
    ks = tuple(sorted(fwd_ms))
    return StepCost("test", 2, (1,), ks, (decode_ms / 1e3,), (tuple(fwd_ms[k] / 1e3 for k in ks),), (head_ms / 1e3,))


def test_auto_takes_the_draft_tokens_that_pay_and_none_when_nothing_does():
    cheap = _cost(10, {1: 10, 2: 11, 4: 12, 8: 14}, 0.5)  # a verify forward costs little more than a decode
    assert choose_drafts(cheap, [[1] * 8], [0.9]) == [8]
    assert choose_drafts(cheap, [[1] * 8], [0.05]) == [0]  # 0.05 expected extra tokens do not pay 10 -> 10.5 ms
    dear = _cost(10, {1: 20, 2: 25, 4: 40, 8: 80}, 0.5)  # a verify forward costs 2x to 8x a decode
    assert choose_drafts(dear, [[1] * 8], [0.99]) == [4]  # 4.9 tokens for 4.2x beats 8.6 for 8.4x
    assert choose_drafts(dear, [[1] * 8], [0.6]) == [0]  # at most 2.5 tokens: no length pays for itself
    assert choose_drafts(cheap, [[], []], [0.9, 0.9]) == [0, 0]
    assert cheap.verify(1, 5, 5) == pytest.approx(12e-3 + 5 * 0.5e-3)
    assert StepCost.from_json(cheap.to_json()) == cheap


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
    rt,
    mode: SpecMode,
    sampling: SamplingParams,
    max_batch: int = 8,
    cost: StepCost | None = None,
    tokenizer=None,
    events_out: list | None = None,
) -> tuple[list[list[int]], DecodeEngine]:
    opts = engine_options(max_batch_size=max_batch, speculative=mode)
    eng = DecodeEngine(rt, tokenizer, opts, name="colocated", step_cost=cost)
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
        if events_out is not None:
            events_out.append(events)
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


def test_auto_speculates_when_the_cost_curve_says_it_pays_and_decodes_plainly_when_not(runtimes):
    """`auto` with a given cost curve (a measured one would make the test depend on this machine's timings):
    cheap verification drafts, verification dearer than any gain decodes one token per step; the output is the
    same either way."""
    sampling = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    plain, off = run_engine(runtimes[0], SpecMode.OFF, sampling)
    cheap = _cost(10, {1: 10.5, 2: 11, 4: 12, 8: 14}, 0.1)
    spec, on = run_engine(runtimes[1], SpecMode.AUTO, sampling, cost=cheap)
    assert spec == plain and on.load().spec_draft_tokens > 0
    assert_no_leaks(off, on)
    dear = _cost(10, {1: 100, 2: 200, 4: 400, 8: 800}, 5)
    never, none = run_engine(runtimes[1], SpecMode.AUTO, sampling, cost=dear)
    assert never == plain and none.load().spec_draft_tokens == 0
    assert_no_leaks(none)


def test_auto_measures_the_cost_curve_once_and_caches_it_beside_the_library(runtimes, tmp_path):
    from llama_relax import spec_cost

    rt = runtimes[0]
    path = spec_cost.cost_path(rt)
    path.unlink(missing_ok=True)
    first = spec_cost.load_or_measure(rt, max_batch=4, repeats=1)
    assert path.exists() and first.batches[0] == 1 and all(d > 0 for d in first.decode_s)
    assert all(len(row) == len(first.drafts) for row in first.verify_s)
    assert rt.sequence_ids() == []  # the probe sequences are gone
    assert spec_cost.load_or_measure(rt, max_batch=4) == first  # read back, not measured again


def test_a_stop_string_inside_a_speculative_run(runtimes):
    """The stop string is two tokens of the greedy output (a repeating prompt: drafts are accepted around it); with
    speculation the request ends at the same token as without, and every page comes back."""
    from test_sampling import CharTokenizer  # token i is the text chr(i)

    tok = CharTokenizer()
    base = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    plain, first = run_engine(runtimes[0], SpecMode.OFF, base, tokenizer=tok)
    assert_no_leaks(first)  # (and its cached sequences leave the runtime for the next engine)
    stop = chr(plain[0][6]) + chr(plain[0][7])
    with_stop = dataclasses.replace(base, stop=(stop,))
    want, off = run_engine(runtimes[0], SpecMode.OFF, with_stop, tokenizer=tok)
    got, on = run_engine(runtimes[1], SpecMode.NGRAM, with_stop, tokenizer=tok)
    assert got == want and len(want[0]) <= 8 and on.load().spec_accepted_tokens > 0
    assert_no_leaks(off, on)


def test_logprobs_of_every_token_of_a_speculative_run(runtimes):
    """Each accepted token carries its logprob and top logprobs, equal (to float32 rounding between the verify
    and decode forwards) to plain decoding's."""
    sampling = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=3)
    a_events: list = []
    b_events: list = []
    want, off = run_engine(runtimes[0], SpecMode.OFF, sampling, events_out=a_events)
    got, on = run_engine(runtimes[1], SpecMode.NGRAM, sampling, events_out=b_events)
    assert got == want and on.load().spec_accepted_tokens > 0
    for xs, ys in zip(a_events, b_events, strict=True):
        for x, y in zip(xs, ys, strict=True):
            assert len(y.logprobs) == 3 and [t.token_id for t in y.logprobs] == [t.token_id for t in x.logprobs]
            assert y.logprob == pytest.approx(x.logprob, abs=1e-3)
            np.testing.assert_allclose([t.logprob for t in y.logprobs], [t.logprob for t in x.logprobs], atol=1e-3)
    assert_no_leaks(off, on)
