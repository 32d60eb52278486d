"""`DecodeBatch` on a pipelined runtime (#28): groups of sequences in flight across steps (vLLM's virtual
engines). A fast layer over a fake runtime whose every row's logits point at `last token + 1`, so a token's value
shows whether a sequence skipped or repeated a step; the real stages are covered by `test_staged_runtime`
(flights bit for bit) and `test_serve_stages` (the decode engine on 2 and 3 stages, through the API)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.decode_batch import DecodeBatch, DecodeSequence, DecodeState
from engine.loop import OutputStream
from engine.messages import ErrorKind, GenerationRequest
from engine.pages import PagePool
from engine.speculation import SpecMode
from llama_relax.generation import SequenceDecoder
from llama_relax.sampling import SamplingParams

VOCAB = 64


@dataclass
class FakePipeline:
    """Records submissions and collections; a flight's logits favour `token + 1` in each row."""

    pipeline_depth: int = 2
    submitted: list[tuple[int, ...]] = field(default_factory=list)
    collected: list[tuple[int, ...]] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    refuse: bool = False

    def decode_submit(self, seq_ids, tokens):
        if self.refuse:
            raise ValueError("decode: token id out of range")
        self.submitted.append(tuple(seq_ids))
        return tuple(seq_ids), tuple(tokens)

    def decode_collect(self, flight) -> np.ndarray:
        seq_ids, tokens = flight
        self.collected.append(seq_ids)
        logits = np.zeros((len(tokens), VOCAB), np.float32)
        logits[np.arange(len(tokens)), [(t + 1) % VOCAB for t in tokens]] = 1.0
        return logits

    def remove_sequence(self, seq_id: int) -> None:
        self.removed.append(seq_id)


def seq(i: int, max_tokens: int = 50) -> DecodeSequence:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    req = GenerationRequest(f"r{i}", (1, 2, 3), params)
    s = DecodeSequence(req, i, SequenceDecoder(params, None, 3, 4096, set()), OutputStream(), DecodeState.DECODING)
    s.length, s.last_token = 3, 10 * i
    return s


def tokens_of(s: DecodeSequence) -> list[int]:
    return list(s.decoder.output_ids)


def test_groups_fly_in_turn_and_every_sequence_gets_each_token_once():
    rt, pool = FakePipeline(), PagePool(total=64)
    batch = DecodeBatch(rt, pool, max_batch=8)
    seqs = [seq(i) for i in range(1, 5)]
    assert batch.step(seqs) == (True, [])  # half the batch submitted, nothing lands yet
    assert rt.submitted == [(1, 2)] and rt.collected == []
    for _ in range(5):
        batch.step(seqs)
    assert rt.submitted == [(1, 2), (3, 4)] * 3  # two groups in flight at once, in turn
    assert rt.collected == [(1, 2), (3, 4)] * 2 + [(1, 2)]  # the oldest lands once both fly
    assert [tokens_of(s) for s in seqs] == [[11, 12, 13], [21, 22, 23], [31, 32], [41, 42]]
    assert batch.batch_sizes == {2: 5} and len(batch.flights) == 1
    assert sum(pool.held.values()) == 4  # each sequence reserved its page (4 tokens in 16-token pages)


def test_a_sequence_ended_in_flight_is_skipped_and_the_last_group_lands_alone():
    rt, pool = FakePipeline(), PagePool(total=64)
    batch = DecodeBatch(rt, pool, max_batch=8)
    seqs = [seq(i) for i in range(1, 5)]
    batch.step(seqs)
    batch.step(seqs)  # (1, 2) landed, (3, 4) in flight
    seqs[2].state = DecodeState.CANCELLED  # the engine ended it while its group flies
    running = [s for s in seqs if s.state is DecodeState.DECODING]
    worked, ended = batch.step(running)  # submits (1, 2) again, lands (3, 4): only 4 samples
    assert worked and ended == [] and tokens_of(seqs[2]) == [] and tokens_of(seqs[3]) == [41]
    assert rt.submitted[-1] == (1, 2)
    worked, ended = batch.step([])  # nothing running: the group in flight still lands
    assert worked and tokens_of(seqs[0]) == [11, 12] and not batch.flights
    assert batch.step([]) == (False, [])


def test_a_finished_sequence_ends_when_its_group_lands_and_a_refused_submit_fails_the_group():
    rt, pool = FakePipeline(), PagePool(total=64)
    batch = DecodeBatch(rt, pool, max_batch=8)
    short, long = seq(1, max_tokens=2), seq(2)
    ended_all = []
    for _ in range(4):
        running = [s for s in (short, long) if s.state is DecodeState.DECODING and s not in ended_all]
        ended_all += [e.seq for e in batch.step(running)[1] if e.error is None]
    assert ended_all == [short] and tokens_of(short) == [11, 12]
    batch.step([long])  # its group lands
    rt.refuse = True
    _, ended = batch.step([long])
    assert [(e.seq, e.error.kind) for e in ended if e.error] == [(long, ErrorKind.INTERNAL)]
    assert "token id" in ended[0].error.message


def test_one_stage_runtimes_and_speculation_keep_the_synchronous_step():
    assert DecodeBatch(FakePipeline(pipeline_depth=1), PagePool(total=8), 8).depth == 1
    assert DecodeBatch(FakePipeline(), PagePool(total=8), 8, spec=SpecMode.NGRAM).depth == 1


def test_the_stage_bench_drives_the_engine_step_on_a_real_runtime(tmp_path, cache_dir):
    """`bench.stage_decode`'s loop (real TVM, a tiny random model): it measures and leaves no sequence behind."""
    from model_files import write_hf_dir
    from reference import random_params
    from test_stages import CFG

    from bench.stage_decode import _decode
    from llama_relax.models import open_model
    from llama_relax.runtime import KVCacheConfig

    path = write_hf_dir(tmp_path, CFG, random_params(CFG, seed=3))
    m = open_model(path, cache_dir=cache_dir, kv=KVCacheConfig(4, 1024, prefill_chunk_size=128), quiet=True)
    try:
        assert _decode(m.runtime, CFG, batch=3, steps=3, depth=1) > 0
        assert m.runtime.sequence_ids() == []
    finally:
        m.close()
