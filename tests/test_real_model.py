"""The bundled SmolLM2-135M-Instruct (real GGUF weights): our compiled model against the NumPy float64 reference
on the same dequantized weights, the tokenizer and the chat template end to end.

Runs when the GGUF is present (scripts/test.sh fetches it for CI); the 30-layer compile is cached per run."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import real_gguf_path
from reference import NumpyLlama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(cache_dir):
    path = real_gguf_path()
    if path is None:
        pytest.skip("bundled GGUF not available (set PDSERVE_TEST_GGUF)")
    from llama_relax.loader import load_params
    from llama_relax.models import open_model
    from llama_relax.runtime import KVCacheConfig

    model = open_model(
        path,
        cache_dir=cache_dir,
        quiet=True,
        kv=KVCacheConfig(max_batch_size=4, max_total_seq_len=1024, prefill_chunk_size=256),
    )
    params = load_params(model.source, model.config, "float32")
    yield model, params
    model.close()


def test_config_and_tokenizer(real):
    model, _ = real
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    assert c.tie_word_embeddings and c.vocab_size == 49152
    tok = model.tokenizer
    assert tok.encode("Hello world") == [19556, 905]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_logits_and_greedy_tokens_match_numpy_reference(real):
    model, params = real
    rt, tok = model.runtime, model.tokenizer
    ref = NumpyLlama(model.config, params)
    prompt = tok.encode("The capital of France is")
    rt.add_sequence(1)
    try:
        logits = rt.prefill([1], [prompt])[0]
        want = ref.forward(1, prompt)[-1]
        assert np.abs(logits - want).max() < 2e-3 * np.abs(want).max()
        tokens = []
        for _ in range(6):
            t = int(np.argmax(logits))
            assert t == int(np.argmax(want))
            tokens.append(t)
            logits = rt.decode([1], [t])[0]
            want = ref.forward(1, [t])[-1]
            assert np.abs(logits - want).max() < 2e-3 * np.abs(want).max()
    finally:
        rt.remove_sequence(1)
    assert "Paris" in tok.decode(tokens)


def test_chat_generation_stops_at_end_of_turn(real):
    from llama_relax.generation import FinishReason, generate
    from llama_relax.sampling import SamplingParams

    model, _ = real
    tok = model.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    events = list(generate(model.runtime, prompt, SamplingParams(max_tokens=48, temperature=0), tok, seq_id=3))
    text = "".join(e.text for e in events)
    assert "Paris" in text
    assert events[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert model.runtime.sequence_ids() == []


def test_gguf_blocks_give_the_float_paths_tokens_in_a_fraction_of_the_memory(real, cache_dir):
    """`--quantization gguf` (the default for a .gguf file: Q4_1 / Q8_0 blocks kept, dequantized in the kernels)
    against `none` (everything dequantized to float32 at load): the same greedy tokens, last-position logits
    within 1e-3, and the weights in memory at most 0.3x."""
    from llama_relax.generation import generate
    from llama_relax.models import open_model
    from llama_relax.runtime import KVCacheConfig
    from llama_relax.sampling import SamplingParams

    model, _ = real
    assert model.compiled.plan.quantization.value == "gguf"
    fp32 = open_model(
        model.source.path,
        cache_dir=cache_dir,
        quiet=True,
        quantization="none",
        kv=KVCacheConfig(max_batch_size=4, max_total_seq_len=1024, prefill_chunk_size=256),
    )
    try:
        tok = model.tokenizer
        for i, text in enumerate(["The capital of France is", "def fibonacci(n):", "Once upon a time"]):
            prompt = tok.encode(text)
            for rt in (model.runtime, fp32.runtime):
                rt.add_sequence(50 + i)
            try:
                a, b = (rt.prefill([50 + i], [prompt])[0] for rt in (model.runtime, fp32.runtime))
                assert np.abs(a - b).max() < 1e-3, (text, np.abs(a - b).max())
            finally:
                for rt in (model.runtime, fp32.runtime):
                    rt.remove_sequence(50 + i)
            params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
            got = [e.token_id for e in generate(model.runtime, prompt, params, tok, seq_id=60 + i)]
            want = [e.token_id for e in generate(fp32.runtime, prompt, params, tok, seq_id=60 + i)]
            assert got == want, text
        weights = [sum(p.numpy().nbytes for p in m.runtime.params) for m in (model, fp32)]
        assert weights[0] <= 0.3 * weights[1], weights
    finally:
        fp32.close()
