"""The model on a CUDA GPU (run by `tests/gpu/run.sh`, or `python -m pytest tests/gpu` on a GPU machine; not
part of the CPU suite, see pyproject's `norecursedirs`):

1. every method of both tiny configs, fp32 and fp16, against the NumPy float64 reference;
2. the bundled SmolLM2 GGUF on CUDA (its 4-bit blocks, fp16): greedy tokens equal to the CPU build's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tvm

if not tvm.cuda(0).exist:
    pytest.skip("no CUDA device", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers

from conftest import TINY_GQA, TINY_TIED, real_gguf_path
from reference import NumpyLlama, random_params

from llama_relax.compile import compile_model, resolve_target
from llama_relax.runtime import KVCacheConfig, ModelRuntime

# fp32: GPU reductions run in another order than NumPy's; fp16: 10-bit mantissas through 2 layers
TOLERANCE = {"float32": 1e-3, "float16": 3e-2}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cuda-cache")


def _close(got: np.ndarray, want: np.ndarray, dtype: str) -> None:
    err = np.abs(got.astype(np.float64) - want).max() / max(1.0, np.abs(want).max())
    assert err < TOLERANCE[dtype], f"{dtype}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("config", [TINY_GQA, TINY_TIED], ids=["gqa", "tied"])
def test_methods_match_the_reference_on_cuda(config, dtype, cache):
    cm = compile_model(config, dtype, resolve_target("cuda"), cache_dir=cache, quiet=True)
    params = random_params(config, seed=0)
    rt = ModelRuntime(
        cm, {k: v.astype(dtype) for k, v in params.items()}, KVCacheConfig(4, 512, config.prefill_chunk_size)
    )
    ref = NumpyLlama(config, params)
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(0, config.vocab_size, n)] for n in (5, config.prefill_chunk_size + 3)]
    start = rt.free_pages()
    for s in (1, 2):
        rt.add_sequence(s)
    logits = rt.prefill([1, 2], prompts)
    for s, p, got in zip((1, 2), prompts, logits, strict=True):
        _close(got, ref.forward(s, p)[-1], dtype)
    tokens = [int(t) for t in logits.argmax(-1)]
    for _ in range(3):
        logits = rt.decode([1, 2], tokens)
        for s, t, got in zip((1, 2), tokens, logits, strict=True):
            _close(got, ref.forward(s, [t])[-1], dtype)
        tokens = [int(t) for t in logits.argmax(-1)]
    for s in (1, 2):
        rt.remove_sequence(s)
    assert rt.free_pages() == start


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def _greedy(model, prompt: str, n: int = 16) -> list[int]:
    from llama_relax.generation import generate
    from llama_relax.sampling import SamplingParams

    ids = model.tokenizer.encode(prompt)
    events = generate(
        model.runtime, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), model.tokenizer, seq_id=1
    )
    return [e.token_id for e in events]


def test_the_bundled_model_on_cuda_gives_the_cpu_tokens(cache):
    from llama_relax.models import open_model

    path = real_gguf_path()
    assert path is not None, "set PDSERVE_TEST_GGUF (tests/gpu/run.sh does)"
    kv = KVCacheConfig(max_batch_size=2, max_total_seq_len=512, prefill_chunk_size=128)
    cpu = open_model(path, cache_dir=cache, kv=kv, quiet=True)
    want = [_greedy(cpu, p) for p in PROMPTS]
    cpu.close()
    gpu = open_model(path, dtype="float16", target=resolve_target("cuda"), cache_dir=cache, kv=kv, quiet=True)
    got = [_greedy(gpu, p) for p in PROMPTS]
    gpu.close()
    same = sum(g == w for g, w in zip(got, want, strict=True))
    # fp16 activations against fp32 may flip a near-tie late in a greedy run; the first 8 tokens must agree
    assert all(g[:8] == w[:8] for g, w in zip(got, want, strict=True)), (got, want)
    print(f"bundled model: {same}/{len(PROMPTS)} greedy runs identical over 16 tokens")
