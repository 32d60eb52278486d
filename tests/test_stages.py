"""Pipeline stages (#28, first slice): each stage compiled for its own layer range with its own weights and KV
cache, chained in one process, against the NumPy float64 reference: the same logits as the whole model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LLAMA3
from model_files import write_hf_dir
from reference import NumpyLlama, random_params

from llama_relax.config import LlamaConfig
from llama_relax.pipeline import open_pipeline, stage_weight_names
from llama_relax.runtime import KVCacheConfig
from llama_relax.stage_model import StageSpec

# 5 layers: stages of 3 + 2, 2 + 2 + 1 (uneven splits), untied LM head and a tied variant
CFG = LlamaConfig(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=5,
    rms_norm_eps=1e-5,
    vocab_size=160,
    context_window_size=256,
    prefill_chunk_size=32,
    rope_scaling=LLAMA3,
)
ATOL = 2e-4  # float32 kernels vs the float64 reference (as test_model)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request, tmp_path_factory):
    cfg = CFG.replace(tie_word_embeddings=request.param)
    params = random_params(cfg, seed=3)
    return cfg, params, write_hf_dir(tmp_path_factory.mktemp("stages"), cfg, params)


def test_stage_weights_and_layers():
    s0, s1, s2 = (StageSpec(i, 3) for i in range(3))
    # balanced with the tables: the embedding (first) and LM head (last) weigh a third of a layer each here
    assert [list(s.layers(CFG)) for s in (s0, s1, s2)] == [[0, 1], [2, 3], [4]]
    assert s1.global_name(CFG, "model.layers.1.mlp.down_proj.weight") == "model.layers.3.mlp.down_proj.weight"
    names = stage_weight_names(CFG, s2)
    assert "model.norm.weight" in names and "lm_head.weight" in names and "model.embed_tokens.weight" not in names
    assert all(int(n.split(".")[2]) == 4 for n in names if n.startswith("model.layers."))
    assert "model.embed_tokens.weight" in stage_weight_names(CFG, s0) and s0.embeds(CFG)
    tied = CFG.replace(tie_word_embeddings=True)  # the tied table lives on the last stage only, which embeds too
    first, last = StageSpec(0, 2), StageSpec(1, 2)
    assert "model.embed_tokens.weight" not in stage_weight_names(tied, first) and not first.embeds(tied)
    assert "model.embed_tokens.weight" in stage_weight_names(tied, last) and last.embeds(tied)
    with pytest.raises(ValueError, match="stage index"):
        StageSpec(3, 3)
    with pytest.raises(ValueError, match="stages must be in"):
        CFG.layer_ranges(6)


@pytest.mark.parametrize("stages", [2, 3])
def test_stage_chain_matches_reference(model, stages, cache_dir):
    cfg, params, path = model
    kv = KVCacheConfig(max_batch_size=4, max_total_seq_len=512, prefill_chunk_size=32)
    pipe = open_pipeline(path, stages, cache_dir=cache_dir, kv=kv, kv_cache_dtype="float32")
    try:
        ranges = cfg.layer_ranges(stages)
        for rt, layers in zip(pipe.stages, ranges, strict=True):  # each holds only its layers' weights and KV
            assert rt.num_kv_layers == len(layers) == len(rt.kv_pages)
            assert sum(n.startswith("model.layers.") for n in rt.compiled.param_names) == 6 * len(
                layers
            )  # 2 norms, qkv, o, gate_up, down
        ref = NumpyLlama(cfg, params)
        rng = np.random.default_rng(stages)
        prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, n)] for n in (45, 7)]  # 45 > the chunk of 32
        seq_ids = [5, 2]
        free = [rt.free_pages() for rt in pipe.stages]
        for s in seq_ids:
            pipe.add_sequence(s)
        logits = pipe.prefill(seq_ids, prompts)
        for s, p, got in zip(seq_ids, prompts, logits, strict=True):
            assert np.abs(got - ref.forward(s, p)[-1]).max() < ATOL
        tokens = [int(t) for t in logits.argmax(-1)]
        for _ in range(3):
            logits = pipe.decode(seq_ids, tokens)
            for s, t, got in zip(seq_ids, tokens, logits, strict=True):
                assert np.abs(got - ref.forward(s, [t])[-1]).max() < ATOL
            tokens = [int(t) for t in logits.argmax(-1)]
        for s in seq_ids:
            pipe.remove_sequence(s)
        assert [rt.free_pages() for rt in pipe.stages] == free  # no page leaked on any stage
    finally:
        pipe.close()


def test_kv_moves_between_stage_counts_bit_identically(model, cache_dir):
    """P1 -> D2 and P2 -> D1: KV exported by one side's stages is imported by the other's, each stage taking only
    its layers, and the next decode step's logits are the same bits on both sides."""
    cfg, _, path = model
    kv = KVCacheConfig(max_batch_size=4, max_total_seq_len=512, prefill_chunk_size=32)
    one, two = (open_pipeline(path, n, cache_dir=cache_dir, kv=kv, kv_cache_dtype="float16") for n in (1, 2))
    try:
        prompt = [int(t) for t in np.random.default_rng(4).integers(0, cfg.vocab_size, 40)]
        for src, dst in ((one, two), (two, one)):
            free = [rt.free_pages() for rt in dst.stages]
            src.add_sequence(1)
            src.prefill([1], [prompt])
            k, v = src.read_kv(1, 0, len(prompt))
            assert k.shape[0] == cfg.num_hidden_layers
            dst.add_sequence(7)
            dst.append_kv(7, k, v)
            np.testing.assert_array_equal(src.decode([1], [3]), dst.decode([7], [3]))
            src.remove_sequence(1)
            dst.remove_sequence(7)
            assert [rt.free_pages() for rt in dst.stages] == free
    finally:
        one.close()
        two.close()
