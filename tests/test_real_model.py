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
