"""SLO attainment over a grid of TTFT x TPOT limits, from one run's requests (DistServe's SLO-scale view).

Which of two servers wins depends on the SLO: a prefill-heavy one meets tight TTFT limits, a decode-isolated one
tight TPOT limits. `--slo-grid ttft=MS,MS,...;tpot=MS,MS,...` computes, for every pair of limits, the fraction of
all requests (failed ones count as missed) whose TTFT and TPOT are both within them; the report prints one table
per run and, for two servers at the same rate, where each one wins; `slo_grid_<rate>.png` plots both and B - A."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.stats import SLO, RequestRecord

Grid = tuple[tuple[float, ...], ...]  # [ttft index][tpot index] -> attainment in [0, 1]


@dataclass(frozen=True)
class SloGrid:
    ttft_ms: tuple[float, ...]
    tpot_ms: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> SloGrid:
        """`ttft=500,1000,2000;tpot=50,100,250`."""
        axes: dict[str, tuple[float, ...]] = {}
        for part in text.split(";"):
            key, sep, vals = part.strip().partition("=")
            key = key.strip().lower()
            if not sep or key not in ("ttft", "tpot") or key in axes:
                raise ValueError(f"--slo-grid: expected ttft=MS,MS,...;tpot=MS,MS,..., got {part.strip()!r}")
            try:
                limits = tuple(float(v) for v in vals.split(",") if v.strip())
            except ValueError:
                raise ValueError(f"--slo-grid {key}: not a list of numbers: {vals!r}") from None
            if not limits or any(not (v > 0 and math.isfinite(v)) for v in limits):
                raise ValueError(f"--slo-grid {key}: give positive limits in ms, got {vals!r}")
            axes[key] = tuple(sorted(set(limits)))
        if set(axes) != {"ttft", "tpot"}:
            raise ValueError("--slo-grid needs both ttft=... and tpot=...")
        return cls(axes["ttft"], axes["tpot"])

    def attainment(self, records: Sequence[RequestRecord]) -> Grid:
        if not records:
            return tuple(tuple(0.0 for _ in self.tpot_ms) for _ in self.ttft_ms)
        ok = [r for r in records if r.ok]
        return tuple(
            tuple(sum(SLO(ttft_ms=a, tpot_ms=b).met_by(r) for r in ok) / len(records) for b in self.tpot_ms)
            for a in self.ttft_ms
        )


def format_grid(name: str, grid: SloGrid, att: Grid) -> str:
    head = f"SLO attainment (%), {name}: rows TTFT limit (ms), columns TPOT limit (ms)"
    lines = [head, f"{'':>10}" + "".join(f"{b:>9g}" for b in grid.tpot_ms)]
    for a, row in zip(grid.ttft_ms, att, strict=True):
        lines.append(f"{a:>10g}" + "".join(f"{100 * v:>9.0f}" for v in row))
    return "\n".join(lines)


def compare_line(a_name: str, b_name: str, a: Grid, b: Grid) -> str:
    """Where each server meets more of the SLOs (cells of the grid), and by how much at most."""
    diffs = [y - x for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    a_wins = sum(d < 0 for d in diffs)
    b_wins = sum(d > 0 for d in diffs)
    best_a = -min(diffs, default=0.0)
    best_b = max(diffs, default=0.0)
    return (
        f"SLO grid: {a_name} meets more requests' SLOs in {a_wins} of {len(diffs)} cells (by up to "
        f"{100 * max(0.0, best_a):.0f} points), {b_name} in {b_wins} (by up to {100 * max(0.0, best_b):.0f}); "
        f"{len(diffs) - a_wins - b_wins} tie"
    )


def plot_pair(plt, path: Path, grid: SloGrid, names: tuple[str, str], a: Grid, b: Grid) -> Path:
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    data = (np.array(a), np.array(b), np.array(b) - np.array(a))
    titles = (names[0], names[1], f"{names[1]} - {names[0]}")
    for ax, m, title, diff in zip(axes, data, titles, (False, False, True), strict=True):
        im = ax.imshow(100 * m, origin="lower", cmap="RdBu" if diff else "viridis", vmin=-100 if diff else 0, vmax=100)
        ax.set_xticks(range(len(grid.tpot_ms)), [f"{v:g}" for v in grid.tpot_ms])
        ax.set_yticks(range(len(grid.ttft_ms)), [f"{v:g}" for v in grid.ttft_ms])
        ax.set(title=f"SLO attainment (%): {title}", xlabel="TPOT limit (ms)", ylabel="TTFT limit (ms)")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{100 * m[i, j]:.0f}", ha="center", va="center", fontsize=8, color="w")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
