"""Pipeline stages over gRPC (`engine/stages.py`), each stage a real process of its own: the driver's chain gives
the logits of the in-process chain bit for bit and those of the float64 reference; calls without the cluster token
are refused before any state changes; bad input names its field; no page leaks."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import grpc
import numpy as np
import pytest
from model_files import write_hf_dir
from reference import NumpyLlama, random_params
from test_stages import ATOL, CFG

from engine.stages import RemotePipeline, StageClient, to_array
from kvtransfer.auth import new_cluster_token
from llama_relax.pipeline import open_pipeline
from llama_relax.runtime import KVCacheConfig
from protos import stage_pb2 as pb

STAGES = 2


@pytest.fixture(scope="module")
def stage_servers(tmp_path_factory, cache_dir):
    params = random_params(CFG, seed=5)
    path = write_hf_dir(tmp_path_factory.mktemp("stage-model"), CFG, params)
    token = new_cluster_token()
    procs, addresses = [], []
    env = {**os.environ, "PDSERVE_CLUSTER_TOKEN": token}
    for i in range(STAGES):
        cmd = [sys.executable, "-m", "engine.stages", "--model", str(path), "--stage", f"{i}/{STAGES}"]
        cmd += ["--cache-dir", str(cache_dir), "--kv-cache-dtype", "float32"]
        p = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        procs.append(p)
    for p in procs:
        line = p.stdout.readline()
        m = re.search(r"stage ready on (\S+)", line)
        assert m, f"stage did not start: {line!r}"
        addresses.append(m.group(1))
    yield path, params, token, addresses
    for p in procs:
        p.stdin.close()
        assert p.wait(30) == 0


def test_remote_chain_equals_local_chain_and_reference(stage_servers, cache_dir):
    path, params, token, addresses = stage_servers
    remote = RemotePipeline([StageClient(a, token) for a in addresses], CFG.vocab_size, CFG.prefill_chunk_size)
    kv = KVCacheConfig(max_batch_size=8, max_total_seq_len=1024, prefill_chunk_size=512)
    local = open_pipeline(path, STAGES, cache_dir=cache_dir, kv=kv, kv_cache_dtype="float32")
    ref = NumpyLlama(CFG, params)
    try:
        assert [(s.first_layer, s.num_layers) for s in remote.states] == [
            (r.start, len(r)) for r in CFG.layer_ranges(2)
        ]
        free = [s.free_pages for s in remote.states]
        rng = np.random.default_rng(11)
        prompts = [[int(t) for t in rng.integers(0, CFG.vocab_size, n)] for n in (40, 3)]
        seq_ids = [4, 9]
        for s in seq_ids:
            remote.add_sequence(s)
            local.add_sequence(s)
        got, want = remote.prefill(seq_ids, prompts), local.prefill(seq_ids, prompts)
        np.testing.assert_array_equal(got, want)  # the hand-off moves float32 hidden states exactly
        for s, p, g in zip(seq_ids, prompts, got, strict=True):
            assert np.abs(g - ref.forward(s, p)[-1]).max() < ATOL
        for _ in range(3):
            tokens = [int(t) for t in got.argmax(-1)]
            got, want = remote.decode(seq_ids, tokens), local.decode(seq_ids, tokens)
            np.testing.assert_array_equal(got, want)
            for s, t, g in zip(seq_ids, tokens, got, strict=True):
                assert np.abs(g - ref.forward(s, [t])[-1]).max() < ATOL
        tokens = [int(t) for t in got.argmax(-1)]
        for s in (20, 21):  # two more sequences: micro-batches of 2 in the pipeline
            remote.add_sequence(s)
            local.add_sequence(s)
        both = [*seq_ids, 20, 21]
        local.prefill([20, 21], [[1, 2, 3], [4, 5]])
        remote.prefill([20, 21], [[1, 2, 3], [4, 5]])
        np.testing.assert_array_equal(
            remote.decode_microbatched(both, [*tokens, 7, 8]), local.decode(both, [*tokens, 7, 8])
        )
        for s in both:
            remote.remove_sequence(s)
        assert [s.free_pages for s in remote.states] == free and all(s.sequences == 0 for s in remote.states)
    finally:
        remote.close()
        local.close()


def test_stage_calls_need_the_token_and_valid_input(stage_servers):
    _, _, token, addresses = stage_servers
    for bad in ("", new_cluster_token()):
        client = StageClient(addresses[1], bad)
        with pytest.raises(grpc.RpcError) as e:
            client.sequences(add=[77])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        client.close()
    client = StageClient(addresses[1], token)
    try:
        assert client.sequences().sequences == 0  # the refused call added nothing
        client.sequences(add=[5])
        req = pb.ForwardRequest(seq_ids=[5], lengths=[2], hidden=to_array(np.zeros((3, CFG.hidden_size), np.float32)))
        with pytest.raises(grpc.RpcError) as e:
            client.forward(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hidden" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            client.forward(pb.ForwardRequest(seq_ids=[6], lengths=[1], hidden=to_array(np.zeros((1, 64), np.float32))))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert client.sequences(remove=[5]).sequences == 0
    finally:
        client.close()
