"""`pdserve serve --kv-cache-dtype q8_0` end to end: disaggregated (every prompt's q8_0 KV moves from the prefill
worker to the decode worker, over TLS with the cluster token: `--internal-tls-cert/--internal-tls-key`) streams
the greedy tokens of a colocated q8_0 server, the cluster status reports the cache's dtype and size, and every
page is free afterwards."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_Q8
from model_files import write_hf_dir
from reference import random_params
from serving import Server, assert_clean_exit, collect, request, tokens_of
from test_kv_auth import cert  # noqa: F401 - the fixture

from llama_relax.kv_dtype import kv_bytes_per_token


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, compiled_q8kv):
    return write_hf_dir(tmp_path_factory.mktemp("q8-model"), TINY_Q8, random_params(TINY_Q8, seed=12))


@pytest.fixture(scope="module")
def servers(model_dir, cache_dir, cert):  # noqa: F811
    common = ["--model", str(model_dir), "--kv-cache-dtype", "q8_0", "--max-total-seq-len", "512"]
    tls = ["--internal-tls-cert", str(cert[0]), "--internal-tls-key", str(cert[1])]
    disagg = Server([*common, *tls, "--local-prefill-max-tokens", "0", "--speculative", "off"], cache_dir)
    colocated = Server([*common, "--colocated", "1", "--speculative", "off"], cache_dir)
    yield disagg, colocated
    assert_clean_exit(disagg)
    assert_clean_exit(colocated)


def test_q8_0_disaggregated_equals_colocated(servers):
    disagg, colocated = servers
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(0, TINY_Q8.vocab_size, n)] for n in (5, 33, 70, 12)]
    # one request at a time on both sides: decode batches of one, so both run the same kernels on the same KV (q8_0
    # rounding would turn a batch-shape-dependent sum order into different tokens at a near-tie)
    got = [collect(disagg.stub, request(p, max_tokens=10)) for p in prompts]
    want = [collect(colocated.stub, request(p, max_tokens=10)) for p in prompts]
    assert [tokens_of(r) for r in got] == [tokens_of(r) for r in want]
    per_token = kv_bytes_per_token(TINY_Q8, "q8_0")
    for responses, p in zip(got, prompts, strict=True):
        assert responses[-1].timings.kv_transfer_bytes == len(p) * per_token  # q8_0 rows on the wire
    for w in disagg.workers():
        assert (w.kv_dtype, w.kv_bytes_per_token, w.refused) == ("q8_0", per_token, "")
    assert disagg.pages_all_free() and colocated.pages_all_free()
