"""Weight loaders: tiny HF (sharded safetensors) and GGUF checkpoints written here, plus the real GGUF (slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file

from llama_relax.config import LlamaConfig
from llama_relax.loader import (
    ModelSource,
    expected_param_shapes,
    gguf_metadata,
    load_config,
    load_params,
    resolve_model,
)
from llama_relax.loader.gguf_file import permute_rope_rows, unpermute_rope_rows

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 64, 96, 4, 2, 2, 40
HEAD_DIM = HIDDEN // HEADS
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "num_hidden_layers": LAYERS,
    "vocab_size": VOCAB,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
}


def hf_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under HF names, HF layout ([out, in])."""
    rng = np.random.default_rng(seed)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    w = {"model.embed_tokens.weight": r(VOCAB, HIDDEN), "model.norm.weight": r(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = r(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = r(HIDDEN)
        w[p + "self_attn.q_proj.weight"] = r(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = r(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = r(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = r(HIDDEN, HEADS * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = r(INTER, HIDDEN)
        w[p + "mlp.up_proj.weight"] = r(INTER, HIDDEN)
        w[p + "mlp.down_proj.weight"] = r(HIDDEN, INTER)
        w[p + "self_attn.rotary_emb.inv_freq"] = r(HEAD_DIM // 2)  # extra, must be ignored
    if not tied:
        w["lm_head.weight"] = r(VOCAB, HIDDEN)
    return w


def expected_params(w: dict[str, np.ndarray], tied: bool, dtype: str) -> dict[str, np.ndarray]:
    """The model's fused/transposed params computed independently from HF-layout float32 weights."""
    out = {"model.embed_tokens.weight": w["model.embed_tokens.weight"]}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = w[p + "input_layernorm.weight"]
        qkv = np.concatenate([w[p + f"self_attn.{x}_proj.weight"] for x in "qkv"], axis=0)
        out[p + "self_attn.qkv_proj.weight"] = qkv.T
        out[p + "self_attn.o_proj.weight"] = w[p + "self_attn.o_proj.weight"].T
        out[p + "post_attention_layernorm.weight"] = w[p + "post_attention_layernorm.weight"]
        gate_up = np.concatenate([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]], axis=0)
        out[p + "mlp.gate_up_proj.weight"] = gate_up.T
        out[p + "mlp.down_proj.weight"] = w[p + "mlp.down_proj.weight"].T
    out["model.norm.weight"] = w["model.norm.weight"]
    if not tied:
        out["lm_head.weight"] = w["lm_head.weight"]
    return {k: v.astype(dtype) for k, v in out.items()}


def assert_params_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray], dtype: str) -> None:
    assert list(got) == list(want)
    for name, arr in got.items():
        assert arr.dtype == np.dtype(dtype) and arr.flags.c_contiguous, name
        np.testing.assert_array_equal(arr, want[name], err_msg=name)


def write_hf(
    directory: Path, w: dict[str, np.ndarray], tied: bool, src_dtype: str = "float32", sharded: bool = True
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**HF_CONFIG, "tie_word_embeddings": tied}))
    cast = ml_dtypes.bfloat16 if src_dtype == "bfloat16" else np.dtype(src_dtype)
    tensors = {k: np.ascontiguousarray(v.astype(cast)) for k, v in w.items()}
    if not sharded:
        save_file(tensors, str(directory / "model.safetensors"))
        return directory
    names = list(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in shard}, str(directory / fname))
        weight_map.update(dict.fromkeys(shard, fname))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


# ---- shapes, resolution -------------------------------------------------------------------------------------
def tiny_config(tied: bool) -> LlamaConfig:
    return LlamaConfig.from_hf_dict({**HF_CONFIG, "tie_word_embeddings": tied})


@pytest.mark.parametrize("tied", [True, False])
def test_expected_param_shapes(tied: bool) -> None:
    shapes = expected_param_shapes(tiny_config(tied))
    qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    assert shapes["model.embed_tokens.weight"] == (VOCAB, HIDDEN)
    assert shapes["model.layers.1.self_attn.qkv_proj.weight"] == (HIDDEN, qkv)
    assert shapes["model.layers.1.self_attn.o_proj.weight"] == (HEADS * HEAD_DIM, HIDDEN)
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (HIDDEN, 2 * INTER)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (INTER, HIDDEN)
    assert shapes["model.norm.weight"] == (HIDDEN,)
    assert ("lm_head.weight" in shapes) is not tied
    assert len(shapes) == 2 + 6 * LAYERS + (0 if tied else 1)
    wide = expected_param_shapes(tiny_config(tied).replace(head_dim=24))  # head_dim override: Hq * d != hidden
    assert wide["model.layers.0.self_attn.qkv_proj.weight"] == (HIDDEN, 8 * 24)
    assert wide["model.layers.0.self_attn.o_proj.weight"] == (4 * 24, HIDDEN)


def test_resolve_model(tmp_path: Path) -> None:
    hf_dir = write_hf(tmp_path / "hf", hf_weights(tied=True), tied=True)
    assert resolve_model(hf_dir) == ModelSource(hf_dir, "hf")
    assert resolve_model(str(hf_dir)).kind == "hf"

    gguf_path = write_gguf(tmp_path / "g" / "m.gguf", hf_weights(tied=True), tied=True)
    assert resolve_model(gguf_path) == ModelSource(gguf_path, "gguf")
    assert resolve_model(gguf_path.parent) == ModelSource(gguf_path, "gguf")

    (gguf_path.parent / "other.gguf").write_bytes(gguf_path.read_bytes())
    with pytest.raises(ValueError, match=r"several \.gguf"):
        resolve_model(gguf_path.parent)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        resolve_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"xx")
    with pytest.raises(ValueError, match=r"not a \.gguf"):
        resolve_model(tmp_path / "weights.bin")
    (tmp_path / "fake.gguf").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad magic"):
        resolve_model(tmp_path / "fake.gguf")


# ---- Hugging Face ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("src_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_hf_sharded(tmp_path: Path, src_dtype: str, tied: bool, dtype: str) -> None:
    w = hf_weights(tied)
    src = resolve_model(write_hf(tmp_path / "m", w, tied, src_dtype))
    config = load_config(src)
    assert config == tiny_config(tied)
    if src_dtype == "bfloat16":  # what the file holds, widened exactly
        w = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in w.items()}
    assert_params_equal(load_params(src, config, dtype), expected_params(w, tied, dtype), dtype)


def test_hf_single_file_and_overrides(tmp_path: Path) -> None:
    w = hf_weights(tied=False)
    src = resolve_model(write_hf(tmp_path / "m", w, tied=False, sharded=False))
    config = load_config(src, context_window_size=64)
    assert config.context_window_size == 64
    assert_params_equal(load_params(src, config), expected_params(w, False, "float32"), "float32")


def test_hf_tied_file_with_lm_head_ignores_it(tmp_path: Path) -> None:
    w = hf_weights(tied=False)  # has lm_head.weight
    src = resolve_model(write_hf(tmp_path / "m", w, tied=True))
    params = load_params(src, load_config(src))
    assert "lm_head.weight" not in params


def test_hf_missing_tensor(tmp_path: Path) -> None:
    w = hf_weights(tied=False)
    del w["model.layers.1.mlp.up_proj.weight"]
    src = resolve_model(write_hf(tmp_path / "m", w, tied=False))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'.*\(96, 64\)"):
        load_params(src, load_config(src))


def test_hf_untied_config_without_lm_head(tmp_path: Path) -> None:
    src = resolve_model(write_hf(tmp_path / "m", hf_weights(tied=True), tied=False))
    with pytest.raises(ValueError, match=r"missing tensor 'lm_head\.weight'"):
        load_params(src, load_config(src))


def test_hf_misshaped_tensor(tmp_path: Path) -> None:
    w = hf_weights(tied=True)
    w["model.layers.0.self_attn.k_proj.weight"] = np.zeros((HIDDEN, HIDDEN), np.float32)
    src = resolve_model(write_hf(tmp_path / "m", w, tied=True))
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight'.*expected \(32, 64\), got \(64, 64\)"
    ):
        load_params(src, load_config(src))


def test_hf_misshaped_embedding_from_config_mismatch(tmp_path: Path) -> None:
    src = resolve_model(write_hf(tmp_path / "m", hf_weights(tied=True), tied=True))
    config = load_config(src, vocab_size=VOCAB + 8)
    with pytest.raises(ValueError, match=r"'model\.embed_tokens\.weight'.*expected \(48, 64\), got \(40, 64\)"):
        load_params(src, config)


def test_bad_dtype_and_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = resolve_model(write_hf(tmp_path / "m", hf_weights(tied=True), tied=True))
    config = load_config(src)
    with pytest.raises(ValueError, match="dtype"):
        load_params(src, config, "int8")
    load_params(src, config, progress=True)
    assert "tensor" in capsys.readouterr().err


# ---- GGUF -----------------------------------------------------------------------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's `permute` (its own copy, independent of the loader)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Per-tensor storage type; layer 0's q/k are F32 so the permutation round trip is checked exactly.
GGUF_TYPES = {
    "model.embed_tokens.weight": QT.Q8_0,
    "lm_head.weight": QT.Q4_1,
    "model.layers.0.self_attn.q_proj.weight": QT.F32,
    "model.layers.0.self_attn.k_proj.weight": QT.F32,
    "model.layers.0.self_attn.v_proj.weight": QT.F16,
    "model.layers.0.self_attn.o_proj.weight": QT.Q4_0,
    "model.layers.0.mlp.gate_proj.weight": QT.Q4_1,
    "model.layers.0.mlp.up_proj.weight": QT.Q8_0,
    "model.layers.0.mlp.down_proj.weight": QT.Q4_0,
    "model.layers.1.self_attn.q_proj.weight": QT.Q4_1,
    "model.layers.1.self_attn.k_proj.weight": QT.Q8_0,
    "model.layers.1.self_attn.v_proj.weight": QT.Q4_0,
    "model.layers.1.self_attn.o_proj.weight": QT.F16,
    "model.layers.1.mlp.gate_proj.weight": QT.Q8_0,
    "model.layers.1.mlp.up_proj.weight": QT.Q4_0,
    "model.layers.1.mlp.down_proj.weight": QT.Q4_1,
}


def gguf_tensor_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    if hf_name in fixed:
        return fixed[hf_name] + ".weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def write_gguf(
    path: Path, w: dict[str, np.ndarray], tied: bool, overrides: dict[str, tuple[QT, np.ndarray]] | None = None
) -> Path:
    """Write `w` as llama.cpp would (q/k permuted, quantized per GGUF_TYPES, norms F32)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    metadata = {
        "name": "tiny",
        "block_count": LAYERS,
        "context_length": 256,
        "embedding_length": HIDDEN,
        "feed_forward_length": INTER,
        "head_count": HEADS,
        "head_count_kv": KV_HEADS,
        "rope_freq_base": 10000.0,
        "layer_norm_rms_eps": 1e-5,
        "vocab_size": VOCAB,
        "rope_dimension_count": HEAD_DIM,
        "tokenizer_model": "gpt2",
        "token_list": [f"t{i}" for i in range(VOCAB)],
        "bos_token_id": 1,
        "add_bos_token": True,
    }
    for key, value in metadata.items():
        getattr(writer, f"add_{key}")(value)
    overrides = overrides or {}
    for name, arr in w.items():
        if name.endswith("inv_freq") or (tied and name == "lm_head.weight"):
            continue
        if name.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, HEADS)
        elif name.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, KV_HEADS)
        if name in overrides:  # (type, already-encoded data)
            qtype, data = overrides[name]
        else:
            qtype = GGUF_TYPES.get(name, QT.F32)
            data = quantize(arr, qtype)
        writer.add_tensor(gguf_tensor_name(name), data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_expected_weights(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF-layout weights as the test's own quantize/dequantize round trip leaves them.

    Quantization blocks run along rows, so permuting rows commutes with it: no permutation is needed here.
    """
    return {k: dequantize(quantize(v, GGUF_TYPES.get(k, QT.F32)), GGUF_TYPES.get(k, QT.F32)) for k, v in w.items()}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gguf_load(tmp_path: Path, tied: bool, dtype: str) -> None:
    w = hf_weights(tied, seed=1)
    src = resolve_model(write_gguf(tmp_path / "tiny.gguf", w, tied))
    config = load_config(src)
    assert config == tiny_config(tied)
    params = load_params(src, config, dtype)
    assert_params_equal(params, expected_params(gguf_expected_weights(w), tied, dtype), dtype)
    if dtype == "float32":  # F32 q/k of layer 0: exactly the HF original, so the permutation is undone
        qkv = params["model.layers.0.self_attn.qkv_proj.weight"]
        np.testing.assert_array_equal(qkv[:, : HEADS * HEAD_DIM], w["model.layers.0.self_attn.q_proj.weight"].T)
        k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM]
        np.testing.assert_array_equal(k, w["model.layers.0.self_attn.k_proj.weight"].T)


def test_gguf_metadata(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", hf_weights(tied=True), tied=True)
    meta = gguf_metadata(path)
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "tiny"
    assert meta["llama.block_count"] == LAYERS and isinstance(meta["llama.block_count"], int)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == 1e-5
    assert meta["llama.rope.freq_base"] == 10000.0
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.tokens"] == [f"t{i}" for i in range(VOCAB)]
    assert meta["tokenizer.ggml.tokens.count"] == VOCAB
    assert meta["has_output_tensor"] is False
    assert gguf_metadata(resolve_model(path)) == meta
    path2 = write_gguf(tmp_path / "untied.gguf", hf_weights(tied=False), tied=False)
    assert gguf_metadata(path2)["has_output_tensor"] is True


def test_gguf_missing_tensor(tmp_path: Path) -> None:
    w = hf_weights(tied=True)
    del w["model.layers.1.self_attn.v_proj.weight"]
    src = resolve_model(write_gguf(tmp_path / "tiny.gguf", w, tied=True))
    with pytest.raises(ValueError, match=r"missing tensor 'blk\.1\.attn_v\.weight'.*\(32, 64\)"):
        load_params(src, load_config(src))


def test_gguf_misshaped_tensor(tmp_path: Path) -> None:
    w = hf_weights(tied=True)
    w["model.layers.1.mlp.down_proj.weight"] = np.zeros((HIDDEN, 64), np.float32)
    src = resolve_model(write_gguf(tmp_path / "tiny.gguf", w, tied=True))
    with pytest.raises(ValueError, match=r"'blk\.1\.ffn_down\.weight'.*expected \(64, 96\), got \(64, 64\)"):
        load_params(src, load_config(src))


def test_gguf_unsupported_quant_type(tmp_path: Path) -> None:
    w = hf_weights(tied=True)
    block, type_size = gguf.GGML_QUANT_SIZES[QT.Q8_1]
    raw = np.zeros((HIDDEN, HIDDEN // block * type_size), np.uint8)  # [rows, bytes] of Q8_1 blocks
    path = write_gguf(
        tmp_path / "tiny.gguf", w, tied=True, overrides={"model.layers.0.self_attn.o_proj.weight": (QT.Q8_1, raw)}
    )
    src = resolve_model(path)
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_output\.weight'.*Q8_1"):
        load_params(src, load_config(src))


def test_rope_permutation_roundtrip() -> None:
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    for n_head in (1, 2, 6):
        permuted = permute_rope_rows(w, n_head)
        np.testing.assert_array_equal(permuted, llama_cpp_permute(w, n_head))
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(unpermute_rope_rows(permuted, n_head), w)


# ---- the real bundled model -----------------------------------------------------------------------------
@pytest.mark.slow
def test_real_gguf() -> None:
    path = os.environ.get("PDSERVE_TEST_GGUF")
    if not path or not Path(path).is_file():
        pytest.skip("set PDSERVE_TEST_GGUF to the SmolLM2-135M GGUF to run")
    src = resolve_model(path)
    assert src.kind == "gguf"
    config = load_config(src)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.hidden_size, config.vocab_size, config.head_dim) == (576, 49152, 64)
    assert config.tie_word_embeddings
    params = load_params(src, config, "float16")
    shapes = expected_param_shapes(config)
    assert list(params) == list(shapes)
    for name, arr in params.items():
        assert arr.shape == shapes[name] and arr.dtype == np.float16 and arr.flags.c_contiguous, name
        assert np.isfinite(arr).all(), name
