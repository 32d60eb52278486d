"""Numeric parity of every exported model method against the NumPy float64 reference (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import TINY_GQA, TINY_TIED
from reference import NumpyLlama, quantized_params, random_params

from llama_relax.runtime import KVCacheConfig, ModelRuntime

ATOL = 2e-4  # float32 kernels vs float64 reference, logits of magnitude ~1-5


def model_params(compiled, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(runtime params, the reference's params): equal, or for a quantized model its arrays and the values the
    kernels dequantize them to."""
    return quantized_params(random_params(compiled.config, seed=seed), compiled.plan)


def make_runtime(compiled, seed: int = 0, **kv) -> tuple[ModelRuntime, NumpyLlama]:
    params, ref_params = model_params(compiled, seed)
    kv_config = KVCacheConfig(
        max_batch_size=kv.get("max_batch_size", 8),
        max_total_seq_len=kv.get("max_total_seq_len", 1024),
        prefill_chunk_size=kv.get("prefill_chunk_size", compiled.config.prefill_chunk_size),
    )
    return ModelRuntime(compiled, params, kv_config), NumpyLlama(compiled.config, ref_params)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    err = np.abs(got.astype(np.float64) - want).max()
    assert err < ATOL, f"max abs error {err} (reference magnitude {np.abs(want).max():.3f})"


def leak_check(rt: ModelRuntime, pages_at_start: int) -> None:
    for sid in rt.sequence_ids():
        rt.remove_sequence(sid)
    assert rt.free_pages() == pages_at_start, "pages leaked"


@pytest.fixture(params=["gqa", "tied", "gqa-q4f32_1", "gqa-q8_0"])
def compiled(request, compiled_gqa, compiled_tied, compiled_gqa_q4, compiled_gqa_q8):
    return {"gqa": compiled_gqa, "tied": compiled_tied, "gqa-q4f32_1": compiled_gqa_q4, "gqa-q8_0": compiled_gqa_q8}[
        request.param
    ]


def test_batched_prefill_and_decode_match_reference(compiled):
    rt, ref = make_runtime(compiled)
    start = rt.free_pages()
    rng = np.random.default_rng(1)
    v = compiled.config.vocab_size
    chunk = rt.prefill_chunk_size
    lengths = [5, chunk + 9, 17, 1]  # one prompt longer than the prefill chunk; several share forwards
    prompts = [[int(t) for t in rng.integers(0, v, n)] for n in lengths]
    seq_ids = [7, 3, 11, 20]  # not 0, not contiguous
    for s in seq_ids:
        rt.add_sequence(s)
    logits = rt.prefill(seq_ids, prompts)
    for s, p, got in zip(seq_ids, prompts, logits, strict=True):
        assert_close(got, ref.forward(s, p)[-1])
    tokens = [int(t) for t in logits.argmax(-1)]
    for _ in range(4):  # decode past position 16 (llama3 original window) for the long prompt
        logits = rt.decode(seq_ids, tokens)
        for s, t, got in zip(seq_ids, tokens, logits, strict=True):
            assert_close(got, ref.forward(s, [t])[-1])
        tokens = [int(t) for t in logits.argmax(-1)]
    for s, n in zip(seq_ids, lengths, strict=True):
        assert rt.sequence_length(s) == n + 4 == rt.kv_length_in_cache(s)
    leak_check(rt, start)


def test_decode_batch_members_join_and_leave(compiled_gqa):
    """A sequence removed mid-batch frees its pages and does not disturb the others."""
    rt, ref = make_runtime(compiled_gqa)
    start = rt.free_pages()
    for s in (1, 2, 3):
        rt.add_sequence(s)
    prompts = [[3, 4, 5, 6], [7] * 20, [9, 10]]
    rt.prefill([1, 2, 3], prompts)
    for s, p in zip((1, 2, 3), prompts, strict=True):
        ref.forward(s, p)
    rt.remove_sequence(2)
    got = rt.decode([3, 1], [11, 12])
    assert_close(got[0], ref.forward(3, [11])[-1])
    assert_close(got[1], ref.forward(1, [12])[-1])
    leak_check(rt, start)


@pytest.fixture(params=["gqa", "gqa-q4f32_1", "gqa-q8_0"])
def gqa_any(request, compiled_gqa, compiled_gqa_q4, compiled_gqa_q8):
    return {"gqa": compiled_gqa, "gqa-q4f32_1": compiled_gqa_q4, "gqa-q8_0": compiled_gqa_q8}[request.param]


def test_verify_returns_logits_for_every_token(gqa_any):
    rt, ref = make_runtime(gqa_any)
    start = rt.free_pages()
    rt.add_sequence(5)
    rt.add_sequence(6)
    rt.prefill([5, 6], [[1, 2, 3], [4, 5, 6, 7, 8]])
    ref.forward(5, [1, 2, 3])
    ref.forward(6, [4, 5, 6, 7, 8])
    out = rt.verify([5, 6], [[9, 10, 11], [12, 13]])
    assert_close(out[0], ref.forward(5, [9, 10, 11]))
    assert_close(out[1], ref.forward(6, [12, 13]))
    rt.popn(5, 2)  # roll back two draft tokens, then continue from there
    ref2 = NumpyLlama(gqa_any.config, model_params(gqa_any, 0)[1])
    ref2.forward(5, [1, 2, 3, 9])
    assert_close(rt.decode([5], [42])[0], ref2.forward(5, [42])[-1])
    leak_check(rt, start)


def _call(rt: ModelRuntime, name: str, seq_ids, chunks, *extra):
    """Call one exported forward function directly (begin/end forward around it)."""
    lengths = [len(c) for c in chunks]
    ids = np.array([t for c in chunks for t in c], dtype=np.int32)
    shape = (len(chunks), 1, rt.config.hidden_size) if name in ("decode", "batch_decode") else (1, len(ids), -1)
    shape = tuple(rt.config.hidden_size if d == -1 else d for d in shape)
    emb = rt._embed(ids, shape)
    rt._begin(seq_ids, lengths)
    out, _ = rt.vm[name](emb, *extra, rt.kv_cache, rt.params)
    rt._end(seq_ids, lengths)
    return out


def test_single_sequence_entry_points(compiled):
    """`prefill`, `decode`, `prefill_to_last_hidden_states` + `get_logits` against the reference."""
    rt, ref = make_runtime(compiled)
    start = rt.free_pages()
    prompt = list(range(3, 3 + 23))
    rt.add_sequence(4)
    logits = _call(rt, "prefill", [4], [prompt]).numpy()  # [1, 1, V]
    want = ref.forward(4, prompt)
    assert logits.shape == (1, 1, rt.config.vocab_size)
    assert_close(logits[0, 0], want[-1])
    logits = _call(rt, "decode", [4], [[8]]).numpy()
    assert_close(logits[0, 0], ref.forward(4, [8])[-1])

    rt.add_sequence(9)
    hidden = _call(rt, "prefill_to_last_hidden_states", [9], [prompt])  # [1, s, h]
    assert tuple(hidden.shape) == (1, len(prompt), rt.config.hidden_size)
    want_hidden = NumpyLlama(rt.config, model_params(compiled, 0)[1]).hidden(0, prompt)
    np.testing.assert_allclose(hidden.numpy()[0], want_hidden, atol=ATOL)
    # the hidden-state methods compose to the same logits as `prefill`
    composed = rt.logits_at(hidden, [len(prompt) - 1])
    assert_close(composed[0], want[-1])
    assert_close(composed[0], logits_prefill_again(rt, prompt))
    leak_check(rt, start)


def logits_prefill_again(rt: ModelRuntime, prompt: list[int]) -> np.ndarray:
    rt.add_sequence(99)
    try:
        return _call(rt, "prefill", [99], [prompt]).numpy()[0, 0].astype(np.float64)
    finally:
        rt.remove_sequence(99)


def test_batch_prefill_logit_positions_and_batch_decode(compiled):
    rt, ref = make_runtime(compiled)
    start = rt.free_pages()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    seq_ids = [2, 5, 8]
    for s in seq_ids:
        rt.add_sequence(s)
    ends = np.cumsum([len(p) for p in prompts]).astype(np.int32) - 1
    positions = tvm.runtime.tensor(ends, rt.device)
    logits = _call(rt, "batch_prefill", seq_ids, prompts, positions).numpy()  # [1, b, V]
    assert logits.shape == (1, 3, rt.config.vocab_size)
    for i, (s, p) in enumerate(zip(seq_ids, prompts, strict=True)):
        assert_close(logits[0, i], ref.forward(s, p)[-1])
    logits = _call(rt, "batch_decode", seq_ids, [[20], [21], [22]]).numpy()  # [b, 1, V]
    for i, s in enumerate(seq_ids):
        assert_close(logits[i, 0], ref.forward(s, [20 + i])[-1])
    # batch_forward_to_last_hidden_states + batch_select_last_hidden_states + get_logits == reference
    hidden = rt.forward_hidden(seq_ids, [[30], [31, 32], [33]])
    got = rt.logits_at(hidden, [0, 2, 3])
    assert_close(got[0], ref.forward(2, [30])[-1])
    assert_close(got[1], ref.forward(5, [31, 32])[-1])
    assert_close(got[2], ref.forward(8, [33])[-1])
    leak_check(rt, start)


def test_get_logits_and_embed_directly(compiled_tied):
    rt, ref = make_runtime(compiled_tied)
    emb = rt._embed(np.array([0, 5, 95], dtype=np.int32), (3, rt.config.hidden_size))
    np.testing.assert_array_equal(emb.numpy(), ref.p["model.embed_tokens.weight"][[0, 5, 95]].astype(np.float32))
    h = np.random.default_rng(0).standard_normal((3, rt.config.hidden_size)).astype(np.float32)
    got = rt.vm["get_logits"](tvm.runtime.tensor(h), rt.params).numpy()
    assert got.dtype == np.float32
    assert_close(got, ref.logits(h.astype(np.float64)))


def test_bad_inputs_raise_clear_errors(compiled_gqa):
    rt, _ = make_runtime(compiled_gqa)
    rt.add_sequence(1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rt.prefill([1], [[1, 2, rt.config.vocab_size]])
    with pytest.raises(ValueError, match="empty prompt"):
        rt.prefill([1], [[]])
    with pytest.raises(ValueError, match="context window"):
        rt.prefill([1], [[1] * (rt.config.context_window_size + 1)])
    with pytest.raises(KeyError, match="not added"):
        rt.decode([42], [1])
    with pytest.raises(ValueError, match="already exists"):
        rt.add_sequence(1)
    assert rt.sequence_length(1) == 0
    rt.remove_sequence(1)


def test_pages_match_tokens(compiled_gqa):
    rt, _ = make_runtime(compiled_gqa, max_total_seq_len=256)
    start = rt.free_pages()
    rt.add_sequence(1)
    assert rt.pages_needed(1, 33) == 3
    rt.prefill([1], [list(range(33))])
    assert start - rt.free_pages() == 3
    assert rt.pages_needed(1, 15) == 0 and rt.pages_needed(1, 16) == 1
    rt.remove_sequence(1)
    assert rt.free_pages() == start


@pytest.mark.parametrize("config", [TINY_GQA, TINY_TIED])
def test_configs_compile_to_distinct_cached_libraries(config, cache_dir):
    from llama_relax.compile import compile_model

    first = compile_model(config, "float32", cache_dir=cache_dir, quiet=True)
    built_ns = first.lib_path.stat().st_mtime_ns
    again = compile_model(config, "float32", cache_dir=cache_dir, quiet=True)
    assert again.cache_hit and again.lib_path == first.lib_path
    assert again.lib_path.stat().st_mtime_ns == built_ns  # served from the cache, not written again


def test_python_built_cache_is_bit_identical_to_the_models_own(compiled_gqa):
    """The runtime rebuilds the model's KV-cache constructor call from Python to reach the page tensors;
    it must behave exactly like `create_paged_kv_cache`."""
    params = random_params(compiled_gqa.config, seed=5)
    kv = KVCacheConfig(max_batch_size=4, max_total_seq_len=512, prefill_chunk_size=32)
    ours = ModelRuntime(compiled_gqa, params, kv)
    theirs = ModelRuntime(compiled_gqa, params, kv, model_create_fn=True)
    c = compiled_gqa.config
    assert len(ours.kv_pages) == c.num_hidden_layers
    assert ours.kv_pages[0].shape[1:] == (2, c.num_key_value_heads, 16, c.head_dim)
    assert ours.free_pages() == theirs.free_pages()
    prompts = [[1, 2, 3, 4, 5], list(range(40))]
    for rt in (ours, theirs):
        rt.add_sequence(3)
        rt.add_sequence(8)
    a, b = ours.prefill([3, 8], prompts), theirs.prefill([3, 8], prompts)
    np.testing.assert_array_equal(a, b)
    for t in range(3):
        np.testing.assert_array_equal(ours.decode([3, 8], [t, t + 1]), theirs.decode([3, 8], [t, t + 1]))
