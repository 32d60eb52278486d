"""GPU checks of the NCCL KV path; run on a CUDA machine with `python -m pytest tests/gpu` (needs cupy). Not part of
the CPU suite (pyproject's `norecursedirs`), so nothing here is ever reported as a skipped CPU test.

- `wsum64` on the device equals the host reference;
- the runtime's device export (`read_kv_device`) and zero-copy device import (`append_kv` with cupy arrays) give a
  sequence whose next logits equal the source's, on one GPU;
- with two GPUs: an `NcclKVSender` in this process pushes a device payload over real NCCL into an
  `NcclKVReceiver` in another process, and the receiver's bytes equal the sent ones.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
if cupy.cuda.runtime.getDeviceCount() < 1:
    pytest.skip("no CUDA device", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers (conftest configs, model files)

from kvtransfer.nccl_transport import CupyNccl, NcclKVReceiver, NcclKVSender, make_device_payload  # noqa: E402
from kvtransfer.payload import HOST_CHECKSUMS, wsum64  # noqa: E402

FP = "fp-gpu"


def test_wsum64_on_device_matches_host():
    host = np.random.default_rng(0).integers(0, 256, (1 << 20) + 5, dtype=np.uint8)
    assert int(wsum64(cupy, cupy.asarray(host))) == HOST_CHECKSUMS["wsum64"](memoryview(host))


def test_device_export_and_import_roundtrip(tmp_path):
    from conftest import TINY_GQA
    from model_files import write_hf_dir
    from reference import random_params

    from llama_relax.compile import TargetSpec
    from llama_relax.models import open_model
    from llama_relax.runtime import KVCacheConfig

    arch = "sm_" + "".join(map(str, cupy.cuda.Device(0).compute_capability))
    model_dir = write_hf_dir(tmp_path / "m", TINY_GQA, random_params(TINY_GQA, seed=4))
    kv = KVCacheConfig(max_batch_size=4, max_total_seq_len=512, prefill_chunk_size=32)
    model = open_model(model_dir, target=TargetSpec("cuda", arch=arch), cache_dir=tmp_path / "c", kv=kv, quiet=True)
    rt = model.runtime
    backend = CupyNccl(0)
    rt.add_sequence(3)
    rt.prefill([3], [list(range(1, 41))])
    kt, vt = rt.read_kv_device(3, 0, 40)
    p = make_device_payload(backend, cupy.from_dlpack(kt), cupy.from_dlpack(vt), FP, 0, "r")
    rt.add_sequence(5)
    rt.append_kv(5, p.k, p.v)
    a, b = rt.decode([3, 5], [7, 7])
    np.testing.assert_array_equal(a, b)
    model.close()


def _receiver_proc(conn) -> None:
    got: list[str] = []

    def sink(header, k, v) -> None:
        got.append(
            f"{int(wsum64(cupy, k.reshape(-1).view(cupy.uint8)))}:{int(wsum64(cupy, v.reshape(-1).view(cupy.uint8)))}"
        )

    rx = NcclKVReceiver(sink, backend=CupyNccl(1), expected_fingerprint=FP)
    rx.start()
    conn.send(rx.advertised)
    conn.recv()
    conn.send(got)
    rx.stop(None)


def test_nccl_push_between_two_gpus():
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices (NCCL refuses two ranks on one GPU)")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver_proc, args=(child,), daemon=True)
    proc.start()
    target = parent.recv()
    backend = CupyNccl(0)
    rng = cupy.random.default_rng(1)
    k = rng.standard_normal((30, 512, 3, 64), dtype=cupy.float32)
    v = rng.standard_normal((30, 512, 3, 64), dtype=cupy.float32)
    tx = NcclKVSender(backend)
    results = [tx.send(make_device_payload(backend, k, v, FP, 0, f"r{i}"), target, timeout_s=120) for i in range(3)]
    tx.close()
    parent.send("stop")
    got = parent.recv()
    proc.join(60)
    assert all(r.ok for r in results), [r.message for r in results]
    want = f"{int(wsum64(cupy, k.reshape(-1).view(cupy.uint8)))}:{int(wsum64(cupy, v.reshape(-1).view(cupy.uint8)))}"
    assert got == [want] * 3
    print("nccl push MiB/s:", [k.nbytes * 2 / r.transfer_s / 2**20 for r in results])
