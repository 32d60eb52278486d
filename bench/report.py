"""Summary tables (stdout), results.json and PNG plots of benchmark runs."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.faults import WINDOW_AFTER_S, FaultImpact
from bench.pools import Timeline, plot_timeline, worker_seconds
from bench.slo_grid import SloGrid, plot_pair
from bench.stats import Percentiles, RunMetrics

LATENCIES = (
    ("ttft_ms", "Time to first token, TTFT"),
    ("tpot_ms", "Time per output token, TPOT (excl. 1st)"),
    ("itl_ms", "Inter-token latency, ITL"),
    ("e2e_ms", "End-to-end latency, E2E"),
)
BREAKDOWN = (
    ("queue_s", "queue"),
    ("prefill_s", "prefill"),
    ("kv_transfer_s", "KV transfer"),
    ("kv_export_s", "  KV export"),
    ("kv_wire_s", "  KV wire"),
    ("kv_import_s", "  KV import"),
    ("kv_tail_s", "KV tail (prefill end -> KV in)"),
    ("first_token_s", "first token"),
    ("decode_s", "decode"),
    ("e2e_s", "e2e"),
)


@dataclass(frozen=True)
class RunOutcome:
    """One measured run: which server, at which rate, its metrics and per-request latency samples (ms)."""

    label: str
    addr: str
    serve_flags: str | None
    request_rate: float
    metrics: RunMetrics
    samples_ms: dict[str, list[float]]
    faults: tuple[FaultImpact, ...] = ()
    output_ids: tuple[tuple[int, ...], ...] = ()  # each request's streamed tokens, in workload order
    prompt_ids: tuple[tuple[int, ...], ...] = ()  # each request's prompt tokens (gRPC), in workload order
    slo_grid: tuple[tuple[float, ...], ...] = ()  # attainment per (TTFT, TPOT) limit pair (bench.slo_grid)
    pools: Timeline = ()  # live workers per role over the run (gRPC; `bench.pools`)
    duration_s: float = 0.0
    itl_points: tuple[tuple[float, float], ...] = ()  # (seconds since start, gap ms) of every streamed gap
    sent_s: tuple[float, ...] = ()  # each request's send time, seconds since start

    @property
    def worker_seconds(self) -> dict[str, float]:
        return worker_seconds(self.pools, self.duration_s) if self.pools else {}

    @property
    def name(self) -> str:
        return f"{self.label} @ {rate_text(self.request_rate)}"


@dataclass(frozen=True)
class Row:
    name: str
    value: float | None = None
    digits: int = 2
    section: bool = False


def rate_text(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g} req/s"


def rate_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


METRICS_NOTE = (
    "Metrics as vLLM's benchmark defines them: TTFT = first streamed token; TPOT = (E2E - TTFT) / (output tokens - 1); "
    "ITL = gaps between streamed chunks, pooled over requests; goodput = requests/s meeting every SLO given."
)


def summary_rows(m: RunMetrics) -> list[Row]:
    rows = [
        Row("Completed requests", m.completed, 0),
        Row("Failed requests", m.failed, 0),
        Row("Migrated requests", m.migrated, 0),
        Row("Duration (s)", m.duration_s),
        Row("Total input tokens", m.total_input_tokens, 0),
        Row("Total output tokens", m.total_output_tokens, 0),
        Row("Request throughput (req/s)", m.request_throughput),
        Row("Output token throughput (tok/s)", m.output_token_throughput),
        Row("Total token throughput (tok/s)", m.total_token_throughput),
        Row("Cached prompt tokens (%)", 100.0 * m.cached_token_fraction, 1),
        Row("KV bytes sent per request (KiB)", m.kv_bytes_per_request / 1024.0, 1),
        Row("Draft tokens verified", float(m.spec_drafted), 0),
        Row("Draft tokens accepted (%)", 100.0 * m.spec_accepted / m.spec_drafted if m.spec_drafted else 0.0, 1),
    ]
    if m.goodput is not None:
        rows += [Row("Goodput (req/s)", m.goodput), Row("SLO attainment (%)", 100.0 * (m.slo_attainment or 0.0), 1)]
    for key, title in LATENCIES:
        p: Percentiles | None = getattr(m, key)
        rows.append(Row(f"{title} (ms)", section=True))
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append(Row(f"  {stat.capitalize() if stat == 'mean' else stat.upper()}", getattr(p, stat, None)))
    rows.append(Row("Server breakdown, mean (ms)", section=True))
    b = m.server_breakdown_s
    for key, title in BREAKDOWN:
        rows.append(Row(f"  {title}", None if b is None else 1000.0 * getattr(b, key)))
    return rows


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.2f}x"


def format_table(runs: Sequence[RunOutcome], title: str) -> str:
    """Metrics of one or more runs side by side; with exactly two runs a `B/A` ratio column is added."""
    cols = [r.name for r in runs]
    width = max(14, *(len(c) + 2 for c in cols))
    ratio = len(runs) == 2
    header = f"{'':<36}" + "".join(f"{c:>{width}}" for c in cols) + (f"{'B/A':>10}" if ratio else "")
    bar = "=" * len(header)
    lines = [bar, f"{title:^{len(header)}}", bar, header]
    per_run = [summary_rows(r.metrics) for r in runs]
    for i, row in enumerate(per_run[0]):
        if row.section:
            lines.append(f"{'-- ' + row.name + ' ':-<{len(header)}}")
            continue
        vals = [rows[i].value for rows in per_run]
        line = f"{row.name:<36}" + "".join(f"{_fmt(v, row.digits):>{width}}" for v in vals)
        lines.append(line + (f"{_ratio(vals[0], vals[1]):>10}" if ratio else ""))
    for r in runs:
        for f in r.faults:
            if f.error:
                lines.append(f"Fault {f.fault} ({r.name}): not injected: {f.error}")
                continue
            lines.append(
                f"Fault {f.fault} ({r.name}): pid {f.pid} at {f.at_s:.1f} s, {f.in_flight} requests in flight, "
                f"{f.migrated_requests} migrated; ITL p50 before {_fmt(f.itl_p50_before_ms, 1)} ms, worst gap after "
                f"{_fmt(f.worst_gap_after_ms, 1)} ms, ITL p99 in the {WINDOW_AFTER_S:g} s after "
                f"{_fmt(f.itl_p99_after_ms, 1)} ms"
            )
    for r in runs:
        if r.worker_seconds:
            used = ", ".join(f"{role} {sec:.0f}" for role, sec in sorted(r.worker_seconds.items()))
            sizes = sorted({n for _, counts in r.pools for n in counts.values()})
            lines.append(f"Worker-seconds ({r.name}): {used} (pool sizes seen: {sizes})")
    for r in runs:
        if r.metrics.failures_by_code:
            codes = ", ".join(f"{k}: {v}" for k, v in r.metrics.failures_by_code.items())
            lines.append(f"Failures ({r.name}): {codes}")
            for code, detail in r.metrics.failure_examples.items():
                lines.append(f"  e.g. {code}: {detail[:200]}")
    if ratio:
        lines.append("B/A: second column divided by the first (latency: < 1 means B is faster; throughput: > 1)")
    lines.append(METRICS_NOTE)
    lines.append(bar)
    return "\n".join(lines)


def format_sweep(runs: Sequence[RunOutcome]) -> str:
    """One line per (server, rate): throughput and latency percentiles."""
    head = (
        "server",
        "rate",
        "done",
        "fail",
        "req/s",
        "tok/s",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "ITL p50",
        "E2E p50",
        "goodput",
    )
    widths = (10, 12, 6, 6, 9, 10, 10, 10, 10, 10, 10, 10, 9)
    lines = ["".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True))]
    for r in runs:
        m = r.metrics
        vals = (
            r.label,
            rate_text(r.request_rate),
            str(m.completed),
            str(m.failed),
            _fmt(m.request_throughput, 2),
            _fmt(m.output_token_throughput, 1),
            _fmt(getattr(m.ttft_ms, "p50", None), 2),
            _fmt(getattr(m.ttft_ms, "p99", None), 2),
            _fmt(getattr(m.tpot_ms, "p50", None), 2),
            _fmt(getattr(m.tpot_ms, "p99", None), 2),
            _fmt(getattr(m.itl_ms, "p50", None), 2),
            _fmt(getattr(m.e2e_ms, "p50", None), 2),
            _fmt(m.goodput, 2),
        )
        lines.append("".join(f"{v:>{w}}" for v, w in zip(vals, widths, strict=True)))
    bar = "=" * len(lines[0])
    return "\n".join([bar, f"{'pdserve bench: rate sweep (latencies in ms)':^{len(bar)}}", bar, *lines, bar])


def run_json(r: RunOutcome) -> dict[str, object]:
    return {
        "label": r.label,
        "server": {"addr": r.addr, "serve_flags": r.serve_flags},
        "request_rate": rate_json(r.request_rate),
        **dataclasses.asdict(r.metrics),
        "faults": [dataclasses.asdict(f) for f in r.faults],
        "slo_grid_attainment": [list(row) for row in r.slo_grid],
        "worker_seconds": r.worker_seconds,
        "pool_timeline": [{"t_s": round(t, 2), **counts} for t, counts in r.pools],
        "samples_ms": r.samples_ms,
    }


def same_tokens_line(a: RunOutcome, b: RunOutcome) -> str | None:
    """How many requests streamed identical tokens on both servers (greedy runs must match everywhere)."""
    pairs = [(x, y) for x, y in zip(a.output_ids, b.output_ids, strict=False) if x and y]
    if not pairs:
        return None  # no token ids recorded (the OpenAI backends see text only)
    same = sum(x == y for x, y in pairs)
    return f"Same tokens on {a.label} and {b.label} @ {rate_text(a.request_rate)}: {same}/{len(pairs)} requests"


def _jsonable(o: object) -> object:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, enum.Enum):
        return o.value
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, float) and math.isinf(o):
        return "inf"
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_results(out_dir: Path, config: dict[str, object], runs: Sequence[RunOutcome]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    doc = {**config, "runs": [run_json(r) for r in runs]}
    path.write_text(json.dumps(doc, indent=2, default=_jsonable, allow_nan=False) + "\n", encoding="utf-8")
    return path


def write_plots(out_dir: Path, runs: Sequence[RunOutcome], grid: SloGrid | None = None) -> list[Path]:
    """latency_cdf.png always; sweep.png when some server ran at two or more finite rates; slo_grid_<rate>.png
    for two servers at a rate with `--slo-grid`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pdserve bench: matplotlib is not installed; skipping the plots", file=sys.stderr)
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_plot_cdfs(plt, out_dir / "latency_cdf.png", runs)]
    if path := _plot_sweep(plt, out_dir / "sweep.png", runs):
        written.append(path)
    for r in runs:
        if r.pools:
            name = f"pools_{r.label}.png".replace(" ", "_")
            written.append(plot_timeline(plt, out_dir / name, r.pools, r.sent_s, r.samples_ms["ttft_ms"], r.itl_points))
    if grid is not None:
        for a, b in same_rate_pairs(runs):
            path = out_dir / f"slo_grid_{rate_text(a.request_rate).replace(' ', '_').replace('/', '')}.png"
            written.append(plot_pair(plt, path, grid, (a.label, b.label), a.slo_grid, b.slo_grid))
    return written


def same_rate_pairs(runs: Sequence[RunOutcome]) -> list[tuple[RunOutcome, RunOutcome]]:
    """(A, B) runs at the same rate, for a two-server comparison."""
    labels = list(dict.fromkeys(r.label for r in runs))
    if len(labels) != 2:
        return []
    by = {(r.label, r.request_rate): r for r in runs}
    rates = list(dict.fromkeys(r.request_rate for r in runs))
    return [(by[labels[0], x], by[labels[1], x]) for x in rates if (labels[0], x) in by and (labels[1], x) in by]


def _plot_cdfs(plt, path: Path, runs: Sequence[RunOutcome]) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, title) in zip(
        axes, (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E latency")), strict=True
    ):
        for r in runs:
            xs = sorted(r.samples_ms.get(key, []))
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=r.name)
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_sweep(plt, path: Path, runs: Sequence[RunOutcome]) -> Path | None:
    labels = list(dict.fromkeys(r.label for r in runs))
    series = {
        lb: sorted((r for r in runs if r.label == lb and math.isfinite(r.request_rate)), key=lambda r: r.request_rate)
        for lb in labels
    }
    if max(len(s) for s in series.values()) < 2:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (key, title) in zip(axes, (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")), strict=True):
        for i, (lb, rs) in enumerate(series.items()):
            rates = [r.request_rate for r in rs]
            for stat, style in (("p50", "-o"), ("p99", "--s")):
                ys = [getattr(getattr(r.metrics, key), stat, math.nan) for r in rs]
                ax.plot(rates, ys, style, color=f"C{i}", label=f"{lb} {stat}")
        ax.set(title=f"{title} vs request rate (finite rates)", xlabel="request rate (req/s)", ylabel="ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
