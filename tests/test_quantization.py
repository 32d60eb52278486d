"""Quantized weights: the quantizers against hand-computed blocks, GGUF blocks kept exactly, the `gguf` plan of a
mixed-type file, and clear errors (group size, scheme on the wrong target, scheme for the wrong source)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_GQA, TINY_TIED
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from test_loader import GGUF_TYPES, expected_params, gguf_expected_weights, hf_weights, write_gguf

from llama_relax.loader import load_config, load_params, quant_plan, resolve_model
from llama_relax.loader.quantize import dequantize, from_gguf_blocks, pack_nibbles, quantize, unpack_nibbles
from llama_relax.quantization import Quantization, WeightFormat, uniform_plan


def test_q4_block_by_hand():
    # one group of 32: max |w| = 7 -> scale 1, w = q - 8 exactly for integers in [-7, 7]
    w = np.array([[*range(-7, 8), 0, *range(7, -8, -1), 0]], dtype=np.float32)  # 32 values
    packed, scale, zero = quantize(WeightFormat.Q4, w)
    assert scale.tolist() == [[1.0]] and zero.tolist() == [[-8.0]]
    q = (w + 8).astype(np.uint8)
    assert packed.shape == (1, 16) and packed.dtype == np.uint8
    assert packed[0, 0] == q[0, 0] | (q[0, 16] << 4)  # byte j: element j (low nibble), element j + 16 (high)
    assert packed[0, 15] == q[0, 15] | (q[0, 31] << 4)
    np.testing.assert_array_equal(unpack_nibbles(packed), q)
    np.testing.assert_array_equal(dequantize(WeightFormat.Q4, [packed, scale, zero]), w)


def test_q8_block_by_hand_and_error_bounds():
    w = np.zeros((2, 64), np.float32)
    w[0, :32] = np.linspace(-1.27, 1.27, 32)
    w[1, 5] = -2.54  # scale 0.02: every other value of the row quantizes to 0
    q, scale = quantize(WeightFormat.Q8, w)
    np.testing.assert_allclose(scale, [[0.01, 0.0], [0.02, 0.0]], rtol=1e-6)
    assert q.dtype == np.int8 and q[0, 0] == -127 and q[0, 31] == 127 and q[1, 5] == -127 and not q[1, 6:].any()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 128)).astype(np.float32)
    for fmt, steps in ((WeightFormat.Q8, 127), (WeightFormat.Q4, 7)):
        back = dequantize(fmt, quantize(fmt, w))
        amax = np.abs(w.reshape(8, 4, 32)).max(axis=2, keepdims=True)
        assert (np.abs(back - w).reshape(8, 4, 32) <= amax / steps / 2 + 1e-6).all()  # half a step at most


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_are_kept_exactly(qtype):
    w = np.random.default_rng(1).standard_normal((6, 96)).astype(np.float32)
    raw = gguf_quantize(w, QT[qtype])
    arrays = from_gguf_blocks(qtype, raw, 6, 96)
    np.testing.assert_array_equal(
        dequantize(WeightFormat.Q8 if qtype == "Q8_0" else WeightFormat.Q4, arrays), gguf_dequantize(raw, QT[qtype])
    )


def test_pack_nibbles_round_trip():
    q = np.random.default_rng(2).integers(0, 16, (3, 64)).astype(np.uint8)
    np.testing.assert_array_equal(unpack_nibbles(pack_nibbles(q)), q)


def test_gguf_plan_keeps_each_tensor_format_and_loads_exactly(tmp_path: Path):
    w = hf_weights(tied=False, seed=3)
    src = resolve_model(write_gguf(tmp_path / "mixed.gguf", w, tied=False))
    config = load_config(src)
    plan = quant_plan(src, config, "auto", "llvm")
    assert plan.quantization is Quantization.GGUF
    fmt = dict(plan.formats)
    assert fmt["model.embed_tokens.weight"] is WeightFormat.Q8 and fmt["lm_head.weight"] is WeightFormat.Q4
    assert fmt["model.layers.0.self_attn.o_proj.weight"] is WeightFormat.Q4  # Q4_0
    assert fmt["model.layers.0.self_attn.qkv_proj.weight"] is WeightFormat.F  # F32/F32/F16 parts
    assert fmt["model.layers.1.self_attn.qkv_proj.weight"] is WeightFormat.F  # Q4_1/Q8_0/Q4_0: parts disagree
    assert fmt["model.layers.1.mlp.down_proj.weight"] is WeightFormat.Q4
    params = load_params(src, config, "float32", plan=plan)
    want = expected_params(gguf_expected_weights(w), False, "float32")
    for name, f in plan.formats:
        if f is WeightFormat.F:
            np.testing.assert_array_equal(params[name], want[name])
            continue
        arrays = [
            params[f"{name}.{s}"].T  # the model stores them k-major
            for s in (("qweight", "scale", "zero") if f is WeightFormat.Q4 else ("qweight", "scale"))
        ]
        got = dequantize(f, arrays)  # [out, in]
        np.testing.assert_array_equal(got, want[name] if "embed" in name or "lm_head" in name else want[name].T)
    assert GGUF_TYPES["model.layers.1.mlp.down_proj.weight"] is QT.Q4_1


def test_scheme_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"down_proj\.weight.*groups of 32"):
        uniform_plan(Quantization.Q4F32_1, TINY_TIED)  # intermediate size 80
    with pytest.raises(ValueError, match="q4f16_1 is for CUDA"):
        uniform_plan(Quantization.Q4F16_1, TINY_GQA, "llvm")
    assert uniform_plan(Quantization.Q4F16_1, TINY_GQA, "cuda").scale_dtype == "float16"
    with pytest.raises(ValueError, match=r"needs a \.gguf model"):
        uniform_plan(Quantization.GGUF, TINY_GQA)


def test_chunked_reader_quantizes_as_the_whole_tensor(monkeypatch, tmp_path):
    """`quantize_rows_from` (a safetensors row reader, a chunk of rows per read) gives the arrays `quantize` gives
    the whole tensor: the loader's bounded-memory path for big embeddings changes no bit."""
    from safetensors.numpy import save_file

    from llama_relax.loader import quantize as qmod
    from llama_relax.loader.hf import SafetensorsSource

    monkeypatch.setattr(qmod, "ROWS_PER_CHUNK", 48)
    w = np.random.default_rng(0).standard_normal((200, 64)).astype(np.float32)
    save_file({"model.embed_tokens.weight": w}, str(tmp_path / "model.safetensors"))
    shape, read = SafetensorsSource(tmp_path).rows("model.embed_tokens.weight")
    assert shape == (200, 64)
    for fmt in (WeightFormat.Q4, WeightFormat.Q8):
        whole = qmod._quantize_rows(fmt, w, "float32")
        chunked = qmod.quantize_rows_from(fmt, 200, read)
        assert all(np.array_equal(a, b) for a, b in zip(whole, chunked, strict=True))
