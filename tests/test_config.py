"""LlamaConfig: construction from HF config.json / GGUF metadata, MLC-style derivation, validation errors."""

from __future__ import annotations

import math

import pytest

from llama_relax.config import LlamaConfig, RopeScaling

HF = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "rms_norm_eps": 1e-5,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",  # extra keys are ignored
}


def test_from_hf_derives_defaults():
    c = LlamaConfig.from_hf_dict(HF)
    assert c.head_dim == 64 and c.num_key_value_heads == 3
    assert c.context_window_size == 8192 and c.prefill_chunk_size == 8192
    assert c.position_embedding_base == 100000 and c.tie_word_embeddings
    assert c.rope_scaling.rope_type == "default"
    mha = LlamaConfig.from_hf_dict({k: v for k, v in HF.items() if k != "num_key_value_heads"})
    assert mha.num_key_value_heads == 9
    assert LlamaConfig.from_hf_dict({**HF, "prefill_chunk_size": 100000}).prefill_chunk_size == 8192


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_llama3_rope_both_spellings(key):
    rope = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    extra = {"rope_theta": 500000.0} if key == "rope_scaling" else {}
    hf = {k: v for k, v in HF.items() if k != "rope_theta"} | extra
    if key == "rope_parameters":
        rope = {**rope, "rope_theta": 500000.0}
    c = LlamaConfig.from_hf_dict({**hf, key: rope})
    assert c.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    assert c.position_embedding_base == 500000.0
    assert c.rope_scaling.to_tvm_dict()["rope_type"] == "llama3"


def test_legacy_type_key_and_round_trip():
    c = LlamaConfig.from_hf_dict(
        {
            **HF,
            "rope_scaling": {
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        }
    )
    assert c.rope_scaling.rope_type == "llama3"
    assert LlamaConfig.from_dict(c.to_dict()) == c


def test_llama3_inv_freq_bands():
    r = RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
    base = RopeScaling().inv_freq(16, 10000.0)
    got = r.inv_freq(16, 10000.0)
    for f0, f in zip(base, got, strict=True):
        wavelen = 2 * math.pi / f0
        if wavelen < 16 / 4:
            assert f == f0  # high frequencies untouched
        elif wavelen > 16:
            assert math.isclose(f, f0 / 8)  # low frequencies divided by factor
        else:
            assert f0 / 8 <= f <= f0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_attention_heads": 7}, "num_attention_heads"),  # does not divide 576
        ({"num_key_value_heads": 4}, "num_key_value_heads"),  # does not divide 9
        ({"rope_scaling": {"rope_type": "yarnish", "factor": 2.0}}, "rope_type"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"rms_norm_eps": 0}, "rms_norm_eps"),
        ({"max_position_embeddings": 0}, "context_window_size"),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192,
                }
            },
            "high_freq_factor",
        ),
    ],
)
def test_invalid_configs_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        LlamaConfig.from_hf_dict({**HF, **change})


def test_missing_required_field():
    with pytest.raises(ValueError, match="vocab_size"):
        LlamaConfig.from_hf_dict({k: v for k, v in HF.items() if k != "vocab_size"})


def test_pipeline_stages_partition_layers_contiguously():
    c = LlamaConfig.from_hf_dict(HF, pipeline_parallel_stages=4)
    # the tied 49152 x 576 table weighs 8 layers (576 x (576 + 2 x 192) + 576^2 + 3 x 576 x 1536 parameters each)
    # and lives on the last stage only: stages of 10, 10, 9 and 1 layers weigh 10, 10, 9 and 9
    assert c.table_layers() == 8.0 and c.embedding_stage(4) == 3
    assert c.layer_partition() == [0, 10, 20, 29, 30]
    ranges = c.stage_layer_ranges()
    assert [i for r in ranges for i in r] == list(range(30))
    untied = c.replace(tie_word_embeddings=False)  # an embedding on the first stage and an LM head on the last
    assert untied.layer_partition() == [0, 4, 16, 28, 30] and untied.embedding_stage(4) == 0
    assert c.layer_ranges(2) == [range(0, 19), range(19, 30)] and c.layer_ranges(1) == [range(30)]
    with pytest.raises(ValueError, match="pipeline_parallel_stages"):
        LlamaConfig.from_hf_dict(HF, pipeline_parallel_stages=31)


def test_from_gguf_metadata():
    meta = {
        "general.architecture": "llama",
        "llama.block_count": 30,
        "llama.context_length": 8192,
        "llama.embedding_length": 576,
        "llama.feed_forward_length": 1536,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
        "llama.rope.freq_base": 100000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": 49152,
        "llama.rope.dimension_count": 64,
        "has_output_tensor": False,
    }
    c = LlamaConfig.from_gguf_metadata(meta)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    assert c.tie_word_embeddings and c.vocab_size == 49152
    with pytest.raises(ValueError, match="architecture"):
        LlamaConfig.from_gguf_metadata({**meta, "general.architecture": "qwen2"})
