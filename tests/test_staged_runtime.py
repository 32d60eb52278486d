"""`StagedRuntime` (#28): a worker's stage servers behind the runtime calls the engines make. Against the in-process
chain of the same stages (bit for bit) and the one-process runtime (the same KV fingerprint, so KV moves between
stage counts): forwards with lazily read logits, micro-batched decode, fork, popn, all-layer KV read and append,
refusals as the runtime's errors, a lost stage reported once, and every page back at the end."""

from __future__ import annotations

import numpy as np
import pytest
from model_files import write_hf_dir
from reference import random_params
from test_stages import CFG

from engine.staged_runtime import StagedRuntime, StageLost
from engine.stages import StageClient, StageServer
from kvtransfer.auth import new_cluster_token
from llama_relax.models import open_model
from llama_relax.pipeline import open_pipeline
from llama_relax.runtime import KVCacheConfig

KV = KVCacheConfig(max_batch_size=8, max_total_seq_len=1024, prefill_chunk_size=32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cache_dir):
    cfg = CFG.replace(tie_word_embeddings=True)
    path = write_hf_dir(tmp_path_factory.mktemp("staged"), cfg, random_params(cfg, seed=8))
    served = open_pipeline(path, 2, cache_dir=cache_dir, kv=KV, kv_cache_dtype="float16")
    local = open_pipeline(path, 2, cache_dir=cache_dir, kv=KV, kv_cache_dtype="float16")
    whole = open_model(path, cache_dir=cache_dir, kv=KV, quiet=True, kv_cache_dtype="float16")
    token = new_cluster_token()
    servers = [StageServer(rt, token=token) for rt in served.stages]
    lost: list[BaseException] = []
    clients = [StageClient(s.start(), token) for s in servers]
    staged = StagedRuntime(clients, cfg, KV, lost.append, cache_dir)
    yield cfg, staged, local, whole.runtime, servers, lost
    staged.close()
    for s in servers[1:]:
        s.stop()
    served.close()
    local.close()
    whole.close()


def test_staged_runtime_equals_the_local_chain(setup):
    cfg, staged, local, whole, servers, _ = setup
    free = staged.free_pages()
    assert staged.kv_fingerprint() == whole.kv_fingerprint()  # KV moves between stage counts
    assert staged.compiled.kv_dtype == "float16" and staged.kv_cache_bytes == 2 * whole.kv_cache_bytes // 2
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, n)] for n in (20, 7)]
    for sid in (1, 2):
        staged.add_sequence(sid)
        local.add_sequence(sid)
    h = staged.forward_hidden([1, 2], prompts)
    want = local._forward([1, 2], prompts, [19, 26])
    np.testing.assert_array_equal(staged.logits_at(h, [19, 26]), want)
    np.testing.assert_array_equal(staged.logits_at(h, [26]), want[1:])  # asked again: the same kept states
    tokens = [int(t) for t in want.argmax(-1)]
    for _ in range(2):
        got, exp = staged.decode([1, 2], tokens), local.decode([1, 2], tokens)
        np.testing.assert_array_equal(got, exp)
        tokens = [int(t) for t in got.argmax(-1)]
    assert staged.sequence_length(1) == 22
    staged.fork_sequence(1, 3, 16)  # a prefix-cache hit: the first 16 tokens shared
    local.stages[0].fork_sequence(1, 3, 16)
    local.stages[1].fork_sequence(1, 3, 16)
    staged.popn(2, 1)
    for rt in local.stages:
        rt.popn(2, 1)
    np.testing.assert_array_equal(staged.decode([3, 2], [5, 6]), local.decode([3, 2], [5, 6]))
    # all-layer KV out, and into a one-process runtime and back: the same bits
    k, v = staged.read_kv(1, 0, 22)
    wk, wv = local.read_kv(1, 0, 22)
    np.testing.assert_array_equal(k, wk)
    np.testing.assert_array_equal(v, wv)
    assert k.shape == (cfg.num_hidden_layers, 22, cfg.num_key_value_heads, cfg.head_dim) and k.dtype == np.float16
    whole.add_sequence(9)
    whole.append_kv(9, k, v)
    staged.add_sequence(10)
    staged.append_kv(10, *whole.read_kv(9, 0, 22))
    # (not against sequence 1: it shares pages with its fork, attended as two blocks merged: other rounding)
    np.testing.assert_array_equal(staged.decode([10], [4]), whole.decode([9], [4]))  # one process = two stages
    whole.remove_sequence(9)
    for sid in (1, 2, 3, 10):
        staged.remove_sequence(sid)
    for sid in (1, 2, 3):
        local.remove_sequence(sid)
    assert staged.sequence_ids() == [] and staged.free_pages() == free
    assert [s.runtime.sequence_ids() for s in servers] == [[], []]


def test_decode_flights_equal_decode_while_other_calls_interleave(setup):
    """Two groups in flight at once (the decode engine's pipelined step), a prefill of another sequence between
    them whose kept states survive the groups landing, and a sequence removed while its group flies."""
    cfg, staged, local, _, servers, _ = setup
    free = staged.free_pages()
    rng = np.random.default_rng(5)
    prompts = {sid: [int(t) for t in rng.integers(0, cfg.vocab_size, 6 + sid % 3)] for sid in (21, 22, 23, 24, 25)}
    for sid in prompts:
        staged.add_sequence(sid)
        local.add_sequence(sid)
    four = [21, 22, 23, 24]
    h = staged.forward_hidden(four, [prompts[s] for s in four])
    ends = list(np.cumsum([len(prompts[s]) for s in four]) - 1)
    tokens = dict(zip(four, (int(t) for t in staged.logits_at(h, ends).argmax(-1)), strict=True))
    local._forward(four, [prompts[s] for s in four], ends)
    a = staged.decode_submit([21, 22], [tokens[21], tokens[22]])
    b = staged.decode_submit([23, 24], [tokens[23], tokens[24]])
    h = staged.forward_hidden([25], [prompts[25]])  # between the flights, on other sequences
    got_a, got_b = staged.decode_collect(a), staged.decode_collect(b)
    np.testing.assert_array_equal(got_a, local.decode([21, 22], [tokens[21], tokens[22]]))
    np.testing.assert_array_equal(got_b, local.decode([23, 24], [tokens[23], tokens[24]]))
    want = local._forward([25], [prompts[25]], [len(prompts[25]) - 1])
    np.testing.assert_array_equal(staged.logits_at(h, [len(prompts[25]) - 1]), want)  # kept across the landings
    c = staged.decode_submit([21, 22], [int(t) for t in got_a.argmax(-1)])
    staged.remove_sequence(22)  # in flight: waits for its forward, then goes from every stage
    got_c = staged.decode_collect(c)
    np.testing.assert_array_equal(got_c, local.decode([21, 22], [int(t) for t in got_a.argmax(-1)]))
    assert staged.sequence_length(21) == len(prompts[21]) + 2 and not staged.has_sequence(22)
    bad = staged.decode_submit([23], [cfg.vocab_size + 3])  # refused by stage 0: the flight's sequence goes
    with pytest.raises(ValueError, match="token id"):
        staged.decode_collect(bad)
    assert not staged.has_sequence(23)
    for sid in (21, 24, 25):
        staged.remove_sequence(sid)
    for sid in prompts:
        local.remove_sequence(sid)
    assert staged.sequence_ids() == [] and staged.free_pages() == free
    assert [s.runtime.sequence_ids() for s in servers] == [[], []]


def test_refusals_are_the_runtimes_errors_and_leave_nothing(setup):
    cfg, staged, _, _, _, lost = setup
    free = staged.free_pages()
    staged.add_sequence(1)
    with pytest.raises(ValueError, match="already exists"):
        staged.add_sequence(1)
    with pytest.raises(ValueError, match="token id"):  # stage 0 refuses: nothing appended anywhere
        staged.forward_hidden([1], [[cfg.vocab_size + 3]])
    assert not staged.has_sequence(1)  # a failed forward drops its sequences, as ModelRuntime does
    staged.add_sequence(2)
    bad = np.zeros((cfg.num_hidden_layers, 3, cfg.num_key_value_heads, cfg.head_dim), np.float32)
    with pytest.raises(ValueError, match="float16"):
        staged.append_kv(2, bad, bad)
    with pytest.raises(ValueError, match="only the latest"):
        h = staged.forward_hidden([2], [[1, 2]])
        staged.forward_hidden([2], [[3]])
        staged.logits_at(h, [0])
    staged.remove_sequence(2)
    assert staged.free_pages() == free and lost == []


def test_a_lost_stage_is_reported(setup):
    """Last (it stops a server): a call that finds a stage gone reports it through `on_lost` and raises."""
    _, staged, _, _, servers, lost = setup
    servers[0].stop()
    with pytest.raises(StageLost):
        staged.add_sequence(5)
    assert len(lost) == 1 and isinstance(lost[0], StageLost)
