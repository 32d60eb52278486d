"""Role switch in place (#29): with the planner on, P/D workers are `RoleWorker` actors; `Scaler.switch` drains a
prefill worker, switches it to decode on the same weights (no reload: the same process) and moves it to the decode
pool, while requests stream through the serving `Router`; then back. No request is lost and every one has the
tokens of an unfailed run. A switched worker killed with SIGKILL comes back from Ray in its first role and the
router switches it again. No page leaks anywhere. Real Ray on loopback, real worker processes, the real tiny model.

(What decides a switch, the planner, is tested as a pure function in test_planner.py.)"""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest
from conftest import TINY_GQA
from model_files import write_hf_dir
from ray_cluster import local_ray
from reference import random_params
from serving import wait_until

from engine.messages import GenerationRequest, Role, WorkerOptions
from llama_relax.sampling import SamplingParams
from router.cluster import ClusterSpec, start_pools, stop_pools
from router.pools import PoolMonitor
from router.router import Done, Router, RouterOptions, ServeMode
from router.scaling import Scaler


@pytest.fixture(scope="module")
def serving(tmp_path_factory, compiled_gqa, cache_dir):
    model = write_hf_dir(tmp_path_factory.mktemp("switch-model"), TINY_GQA, random_params(TINY_GQA, seed=31))
    opts = WorkerOptions(
        model=str(model),
        cache_dir=str(cache_dir),
        max_batch_size=8,
        max_total_seq_len=1024,
        prefill_chunk_size=32,
        kv_cache_dtype="float32",  # greedy tokens compared across batch shapes
    )
    spec = ClusterSpec(prefill_workers=2, decode_workers=1, switchable=True)
    with local_ray({"prefill": 2, "decode": 2}) as ray:
        cluster = start_pools(ray, spec, opts)
        monitor = PoolMonitor(cluster.pools, interval_s=0.2).start()
        router = Router(cluster.pools, ServeMode.DISAGGREGATED, RouterOptions(local_prefill_max_tokens=0))
        scaler = Scaler(ray, spec, opts, cluster, monitor, drain_timeout_s=60, stall_timeout_s=30, stuck_after_s=30)
        yield ray, cluster, router, scaler
        scaler.close()
        monitor.stop()
        router.close()
        stop_pools(ray, cluster)


def request(i: int, tag: str) -> GenerationRequest:
    rng = np.random.default_rng(i)
    prompt = tuple(int(t) for t in rng.integers(0, TINY_GQA.vocab_size, 5 + 7 * (i % 5)))
    return GenerationRequest(f"{tag}-{i}", prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))


def tokens(router: Router, req: GenerationRequest) -> list[int]:
    out = []
    for item in router.generate(req):
        if isinstance(item, Done):
            return out
        out.append(item.token_id)
    raise AssertionError("the router ended without Done")


class Load:
    """Clients sending requests one after another until stopped; each checks its tokens against the reference."""

    def __init__(self, router: Router, want: dict[int, list[int]], clients: int = 4) -> None:
        self.router, self.want, self.done, self.errors = router, want, 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(clients)]
        for t in self._threads:
            t.start()

    def _client(self, c: int) -> None:
        n = 0
        while not self._stop.is_set():
            i = (c + 4 * n) % len(self.want)
            try:
                got = tokens(self.router, request(i, f"load{c}-{n}"))
                if got != self.want[i]:
                    self.errors.append(f"request {i}: {got} != {self.want[i]}")
            except Exception as e:  # a lost request
                self.errors.append(f"request {i}: {type(e).__name__}: {e}")
            self.done += 1
            n += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


def _pool(cluster, role: Role) -> list:
    return [w for w in cluster.pools.pool(role) if w.alive and not w.draining]


def _no_leaks(cluster) -> bool:
    loads = [w.client.load() for w in cluster.pools.workers]
    return all(ld.free_pages + ld.cached_pages == ld.total_pages and ld.sequences == 0 for ld in loads)


def test_switches_under_load_lose_no_request(serving):
    _, cluster, router, scaler = serving
    want = {i: tokens(router, request(i, "ref")) for i in range(12)}  # one at a time, before any switch
    pids = {w.info.pid for w in cluster.pools.prefill}
    load = Load(router, want)
    try:
        wait_until(lambda: load.done >= 4, 120, "requests flowing")
        moved = scaler.switch(Role.DECODE, Role.PREFILL)
        assert moved is not None and moved.role is Role.PREFILL
        wait_until(lambda: len(_pool(cluster, Role.DECODE)) == 2 and not scaler.busy(Role.DECODE), 120, "2 decode")
        assert len(cluster.pools.prefill) == 1
        switched = next(w for w in cluster.pools.decode if w.info.pid in pids)  # the same process: no reload
        assert switched.info.role is Role.DECODE and switched.kv_address
        done = load.done
        wait_until(lambda: load.done >= done + 8, 120, "requests on the new layout")
        assert switched.load.steps > 0 or switched.client.load().steps > 0  # it decodes now

        old_pid = switched.info.pid
        os.kill(old_pid, signal.SIGKILL)  # Ray restarts it as prefill; the router switches it back
        wait_until(
            lambda: switched.alive and switched.info.pid != old_pid and switched.info.role is Role.DECODE,
            180,
            "the restarted worker switched back to decode",
        )
        assert switched in cluster.pools.decode and switched.restarts == 1
        done = load.done
        wait_until(lambda: load.done >= done + 8, 120, "requests after the restart")

        assert scaler.switch(Role.PREFILL, Role.DECODE) is not None  # and back, under load
        wait_until(lambda: len(_pool(cluster, Role.PREFILL)) == 2 and not scaler.busy(Role.PREFILL), 120, "2 prefill")
        done = load.done
        wait_until(lambda: load.done >= done + 8, 120, "requests after switching back")
    finally:
        load.stop()
    assert load.errors == []
    wait_until(lambda: _no_leaks(cluster), 30, "every page free")
