"""`ServeConfig`: every `pdserve serve` flag, checked once, here, at the edge.

`ServeConfig.from_args(args)` raises `UserError` with one line that names the flag (or the flags of a bad
combination); nothing further down checks a flag again. It then builds the typed options each part takes, by
keyword: `WorkerOptions` (every worker), `RouterOptions`, `ClusterSpec` and the fault plan."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.faults import Fault, FaultPlan
from engine.messages import Role, StagePlacement, WorkerOptions
from engine.speculation import SpecMode
from kvtransfer.auth import InternalTLS, new_cluster_token
from kvtransfer.net import is_loopback
from llama_relax.errors import UserError
from llama_relax.kv_dtype import resolve_kv_dtype
from llama_relax.loader import load_config, resolve_model
from router.cluster import ClusterSpec
from router.planner import PoolRange, Slo
from router.router import RouterOptions

MAX_AUTO_BATCH = 32
TOKENS_PER_SEQUENCE = 256  # the auto batch size gives each sequence at least this much KV on average
MAX_DRAFT = 32  # --num-speculative-tokens at most
API_SPARE_CALLS = 16  # gRPC threads beyond running + queued requests: health, status, refusals
_URL = re.compile(r"https?://[^/\s]+(/\S*)?")


def auto_batch_size(max_total_seq_len: int) -> int:
    """The default `--max-batch-size`: as many sequences as the KV capacity holds at 256 tokens each, 1..32."""
    return max(1, min(MAX_AUTO_BATCH, max_total_seq_len // TOKENS_PER_SEQUENCE))


def _internal_tls(cert: Path | None, key: Path | None) -> InternalTLS | None:
    """`--internal-tls-cert` / `--internal-tls-key`: both or neither; read once here (workers get the PEM text)."""
    if cert is None and key is None:
        return None
    _check(cert is not None, "--internal-tls-cert", "is needed with --internal-tls-key")
    _check(key is not None, "--internal-tls-key", "is needed with --internal-tls-cert")
    texts = []
    for flag, path, marker in (
        ("--internal-tls-cert", cert, "CERTIFICATE"),
        ("--internal-tls-key", key, "PRIVATE KEY"),
    ):
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{flag}: cannot read {path}: {e}") from None
        _check("-----BEGIN " in text and marker in text, flag, f"{path} is not a PEM {marker.lower()}")
        texts.append(text)
    return InternalTLS(texts[0], texts[1])


@dataclass(frozen=True)
class PlannerSpec:
    """The planner's settings (`router.planner`): the pools it sizes, the SLO, the tick."""

    ranges: dict[Role, PoolRange]  # only the pools given as MIN:MAX with MIN < MAX
    slo: Slo
    interval_s: float
    node_wait_s: float = 120.0  # a new worker not up by then found no node: the planner may switch a role


def _planner(
    ranges: dict[Role, PoolRange], slo: Slo | None, interval_s: float, node_wait_s: float
) -> PlannerSpec | None:
    """The planner is on when a pool's size is a range; a range needs an SLO and an SLO a range."""
    ranged = {role: r for role, r in ranges.items() if not r.fixed}
    flag = {Role.PREFILL: "--prefill-workers", Role.DECODE: "--decode-workers"}
    for role in ranged:
        _check(slo is not None, flag[role], "a MIN:MAX range needs --slo ttft=MS,itl=MS (what the planner sizes to)")
    _check(slo is None or bool(ranged), "--slo", "needs a range to size: --prefill-workers or --decode-workers MIN:MAX")
    _check(interval_s > 0, "--planner-interval-s", f"must be > 0 seconds, got {interval_s}")
    _check(node_wait_s > 0, "--planner-node-wait-s", f"must be > 0 seconds, got {node_wait_s}")
    return PlannerSpec(ranged, slo, interval_s, node_wait_s) if ranged and slo is not None else None


def _check(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise UserError(f"{flag}: {message}")


@dataclass(frozen=True)
class ServeConfig:
    model: str
    cache_dir: str
    dtype: str
    target: str
    quantization: str
    kv_cache_dtype: str  # resolved: "float32" | "float16" | "q8_0" (llama_relax.kv_dtype)
    cluster: ClusterSpec
    host: str
    port: int
    http_port: int  # 0: no HTTP API
    metrics_port: int  # 0: none
    api_key: str | None
    otlp_traces_endpoint: str | None
    max_batch_size: int
    max_total_seq_len: int
    prefill_chunk_size: int
    prefix_cache: bool
    kv_stream: bool
    kv_stream_tail: int
    speculative: SpecMode
    num_speculative_tokens: int
    kv_lease_s: float
    stall_timeout_s: float
    drain_timeout_s: float
    router: RouterOptions
    faults: FaultPlan
    stage_placement: StagePlacement = StagePlacement.PACK
    planner: PlannerSpec | None = None  # on when a pool's size is a range
    # internal gRPC services (KV pushes) require it: one random token per serve, handed to every worker actor
    cluster_token: str = dataclasses.field(default_factory=new_cluster_token, repr=False)
    internal_tls: InternalTLS | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace, default_model: Callable[[], Path]) -> ServeConfig:
        """Check every flag (one `UserError` naming it); `default_model()` (it may fetch the bundled model) is
        called only when `--model` is not given, after every check passed."""
        a = args
        try:
            ranges = {
                Role.PREFILL: PoolRange.parse(str(a.prefill_workers), "--prefill-workers", 1),
                Role.DECODE: PoolRange.parse(str(a.decode_workers), "--decode-workers", 1),
            }
            slo = Slo.parse(a.slo) if a.slo is not None else None
        except ValueError as e:
            raise UserError(str(e)) from None
        _check(a.colocated >= 0, "--colocated", f"must be >= 0, got {a.colocated}")
        _check(
            not (a.colocated and any(r != PoolRange(1, 1) for r in ranges.values())),
            "--colocated",
            "replaces --prefill-workers/--decode-workers; give one or the other",
        )
        planner = _planner(ranges, slo, a.planner_interval_s, a.planner_node_wait_s)
        _check(a.threads_per_worker >= 0, "--threads-per-worker", f"must be >= 0, got {a.threads_per_worker}")
        for flag, value in (
            ("--prefill-stages", a.prefill_stages),
            ("--decode-stages", a.decode_stages),
            ("--stages", a.stages),
        ):
            _check(value >= 1, flag, f"must be >= 1, got {value}")
        _check(
            a.stages == 1 or a.colocated > 0,
            "--stages",
            "splits --colocated workers; use --prefill-stages/--decode-stages",
        )
        for flag, value in (("--prefill-stages", a.prefill_stages), ("--decode-stages", a.decode_stages)):
            _check(not (a.colocated and value != 1), flag, "splits a P/D pool; with --colocated use --stages")
        for flag, port in (("--port", a.port), ("--http-port", a.http_port), ("--metrics-port", a.metrics_port)):
            _check(0 <= port < 65536, flag, f"must be in [0, 65535], got {port}")
        _check(a.max_total_seq_len > 0, "--max-total-seq-len", f"must be > 0, got {a.max_total_seq_len}")
        _check(a.max_batch_size >= 0, "--max-batch-size", f"must be >= 0 (0: auto), got {a.max_batch_size}")
        _check(a.prefill_chunk_size > 0, "--prefill-chunk-size", f"must be > 0, got {a.prefill_chunk_size}")
        _check(a.local_prefill_max_tokens >= 0, "--local-prefill-max-tokens", "must be >= 0")
        _check(a.kv_stream_tail >= 0, "--kv-stream-tail", f"must be >= 0, got {a.kv_stream_tail}")
        _check(a.migration_limit >= 0, "--migration-limit", f"must be >= 0, got {a.migration_limit}")
        k = a.num_speculative_tokens
        _check(1 <= k <= MAX_DRAFT, "--num-speculative-tokens", f"must be in [1, {MAX_DRAFT}], got {k}")
        _check(a.max_queued_requests >= 1, "--max-queued-requests", f"must be >= 1, got {a.max_queued_requests}")
        for flag, seconds, positive in (
            ("--kv-lease-s", a.kv_lease_s, True),
            ("--stall-timeout", a.stall_timeout, True),
            ("--recovery-timeout", a.recovery_timeout, False),
            ("--max-queue-wait-s", a.max_queue_wait_s, False),
            ("--drain-timeout", a.drain_timeout, False),
        ):
            ok = seconds > 0 if positive else seconds >= 0  # also refuses nan
            _check(ok, flag, f"must be {'>' if positive else '>='} 0 seconds, got {seconds}")
        endpoint = a.otlp_traces_endpoint
        _check(endpoint is None or bool(_URL.fullmatch(endpoint)), "--otlp-traces-endpoint", "an http(s):// URL")
        try:
            faults = FaultPlan(tuple(Fault.parse(f) for f in a.inject_fault), a.fault_marker_dir)
        except ValueError as e:
            raise UserError(str(e)) from None
        caching = not a.no_prefix_cache
        model = a.model or default_model()
        most = max(a.prefill_stages, a.decode_stages, a.stages)
        if most > 1:
            layers = load_config(resolve_model(Path(model))).num_hidden_layers
            for flag, value in (
                ("--prefill-stages", a.prefill_stages),
                ("--decode-stages", a.decode_stages),
                ("--stages", a.stages),
            ):
                _check(value <= layers, flag, f"must be at most the model's {layers} layers, got {value}")
        return cls(
            model=str(Path(model).resolve()),
            cache_dir=str(Path(a.cache_dir).resolve()),
            dtype=a.dtype,
            target=a.target,
            quantization=a.quantization,
            kv_cache_dtype=resolve_kv_dtype(a.kv_cache_dtype, a.dtype, a.target),
            cluster=ClusterSpec(
                prefill_workers=ranges[Role.PREFILL].min,
                decode_workers=ranges[Role.DECODE].min,
                prefill_max=ranges[Role.PREFILL].max,
                decode_max=ranges[Role.DECODE].max,
                colocated=a.colocated,
                address=a.address,
                threads_per_worker=a.threads_per_worker,
                prefill_stages=a.prefill_stages,
                decode_stages=a.decode_stages,
                colocated_stages=a.stages,
                switchable=planner is not None,
            ),
            stage_placement=StagePlacement(a.stage_placement),
            planner=planner,
            host=a.host,
            port=a.port,
            http_port=a.http_port,
            metrics_port=a.metrics_port,
            api_key=a.api_key or os.environ.get("PDSERVE_API_KEY") or None,
            internal_tls=_internal_tls(a.internal_tls_cert, a.internal_tls_key),
            otlp_traces_endpoint=endpoint,
            max_batch_size=a.max_batch_size or auto_batch_size(a.max_total_seq_len),
            max_total_seq_len=a.max_total_seq_len,
            prefill_chunk_size=a.prefill_chunk_size,
            prefix_cache=caching,
            kv_stream=not a.no_kv_stream,
            kv_stream_tail=a.kv_stream_tail,
            speculative=SpecMode(a.speculative),
            num_speculative_tokens=k,
            kv_lease_s=a.kv_lease_s,
            stall_timeout_s=a.stall_timeout,
            drain_timeout_s=a.drain_timeout,
            router=RouterOptions(
                migration_limit=a.migration_limit,
                recovery_timeout_s=a.recovery_timeout,
                max_queue_wait_s=a.max_queue_wait_s,
                max_queued=a.max_queued_requests,
                cache_aware=caching,
                local_prefill_max_tokens=a.local_prefill_max_tokens if caching else 0,
            ),
            faults=faults,
        )

    @property
    def open_api(self) -> bool:
        """Served beyond loopback without a key: anyone who reaches it can use it (serve warns)."""
        return self.api_key is None and not is_loopback(self.host)

    @property
    def grpc_calls(self) -> int:
        """gRPC threads: every running and queued request holds one, plus spares (health, status, refusals)."""
        running = self.max_batch_size * (self.cluster.colocated or self.cluster.decode_max)
        return running + self.router.max_queued + API_SPARE_CALLS

    def worker_options(self) -> WorkerOptions:
        return WorkerOptions(
            model=self.model,
            cache_dir=self.cache_dir,
            dtype=self.dtype,
            target=self.target,
            quantization=self.quantization,
            kv_cache_dtype=self.kv_cache_dtype,
            cluster_token=self.cluster_token,
            internal_tls=self.internal_tls,
            max_batch_size=self.max_batch_size,
            max_total_seq_len=self.max_total_seq_len,
            prefill_chunk_size=self.prefill_chunk_size,
            kv_host=self.host,
            kv_lease_s=self.kv_lease_s,
            prefix_cache=self.prefix_cache,
            kv_stream=self.kv_stream,
            kv_stream_tail=self.kv_stream_tail,
            speculative=self.speculative,
            num_speculative_tokens=self.num_speculative_tokens,
            faults=self.faults,
            stage_placement=self.stage_placement,
        )
