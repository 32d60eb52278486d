"""`pdserve` CLI end to end on a tiny Hugging Face directory written by the test: greedy output equals the NumPy
reference, JSON shape, and one-line errors with non-zero exit for bad input."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_GQA, real_gguf_path
from model_files import write_hf_dir
from reference import NumpyLlama, random_params


def pdserve(*args: str, cache_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PDSERVE_CACHE_DIR": str(cache_dir)}
    return subprocess.run(
        [sys.executable, "-m", "pdserve", *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, compiled_gqa):
    params = random_params(TINY_GQA, seed=3)
    return write_hf_dir(tmp_path_factory.mktemp("tiny-hf"), TINY_GQA, params), params


def test_generate_json_matches_reference_greedy(tiny_dir, cache_dir):
    path, params = tiny_dir
    prompt = [
        5,
        17,
        33,
        2,
        90,
        11,
        64,
        7,
        8,
        9,
        10,
        120,
        3,
        4,
        5,
        6,
        7,
        150,
        21,
        22,
        23,
        24,
        25,
        26,
        27,
        28,
        29,
        30,
        31,
        32,
        33,
        34,
        35,
        36,
        37,
    ]  # 35 tokens > the 32-token prefill chunk
    r = pdserve(
        "generate",
        "--model",
        str(path),
        "--prompt-ids",
        ",".join(map(str, prompt)),
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--logprobs",
        "3",
        "--json",
        cache_dir=cache_dir,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # stdout holds exactly one JSON object
    ref = NumpyLlama(TINY_GQA, params)
    want, logits = [], ref.forward(0, prompt)[-1]
    for _ in range(6):
        want.append(int(np.argmax(logits)))
        logits = ref.forward(0, [want[-1]])[-1]
    assert out["prompt_token_ids"] == prompt
    assert out["token_ids"] == want
    assert out["finish_reason"] == "length" and out["text"] == ""
    assert len(out["logprobs"]) == 6 and all(len(lp) == 3 for lp in out["logprobs"])
    assert all(lp[0]["token_id"] == t for lp, t in zip(out["logprobs"], want, strict=True))
    assert all(a["logprob"] >= b["logprob"] for lp in out["logprobs"] for a, b in itertools.pairwise(lp))


def test_generate_seeded_sampling_is_reproducible(tiny_dir, cache_dir):
    path, _ = tiny_dir
    args = (
        "generate",
        "--model",
        str(path),
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--seed",
        "11",
        "--json",
    )
    a, b = pdserve(*args, cache_dir=cache_dir), pdserve(*args, cache_dir=cache_dir)
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-ids", "1,2", "--temperature", "-1"], "temperature"),
        (["--prompt-ids", "1,2", "--top-p", "0"], "top_p"),
        (["--prompt-ids", "1,2", "--top-k", "-3"], "top_k"),
        (["--prompt-ids", "1,999999"], "outside the vocabulary"),
        (["--prompt-ids", ",".join(["1"] * 300)], "context window"),
        (["--prompt", "hi"], "no tokenizer"),
    ],
)
def test_generate_bad_input_is_one_line_error(tiny_dir, cache_dir, args, message):
    path, _ = tiny_dir
    r = pdserve("generate", "--model", str(path), *args, cache_dir=cache_dir)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("pdserve: error:")


def test_missing_model_and_bad_config(tmp_path, cache_dir):
    r = pdserve("generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1", cache_dir=cache_dir)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "intermediate_size": 8,
                "num_attention_heads": 5,
                "num_hidden_layers": 1,
                "vocab_size": 10,
                "max_position_embeddings": 32,
            }
        )
    )
    r = pdserve("generate", "--model", str(bad), "--prompt-ids", "1", cache_dir=cache_dir)
    assert r.returncode == 2 and "num_attention_heads" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_tokenize_real_model_json(cache_dir):
    gguf = real_gguf_path()
    if gguf is None:
        pytest.skip("bundled GGUF not available")
    r = pdserve("tokenize", "--model", str(gguf), "--text", "Hello world", "--json", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"ids": [19556, 905]}
