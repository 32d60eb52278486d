"""Why two greedy runs differ: the top-2 logit margin where their tokens first part.

Speculative decoding must stream the tokens plain decoding streams. Two runs of the same requests (`--compare`, gRPC:
the prompts come back as token ids) may still part at a near-tie: the verify forward sums in another order than
the decode step, so a choice between two logits closer than float32 rounding can flip. For each request whose
tokens differ, this runs the model here (the bench's own process: prompt + the common output prefix, one prefill)
and reports the margin between the two best logits at the first differing position. A mismatch at a margin below
`TIE` is a near-tie; any other mismatch is a bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TIE = 1e-4  # a top-2 logit margin below this is a near-tie


@dataclass(frozen=True)
class Mismatch:
    request: int  # index in the workload
    position: int  # first output position where the runs differ
    margin: float  # top-1 minus top-2 logit there (computed here)

    @property
    def near_tie(self) -> bool:
        return self.margin < TIE


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def mismatches(
    prompts: Sequence[Sequence[int]],
    outs_a: Sequence[Sequence[int]],
    outs_b: Sequence[Sequence[int]],
    model: str | None,
    cache_dir: Path,
) -> list[Mismatch]:
    """The requests whose outputs differ (both runs completed them), each with its margin."""
    todo = []
    for i, (p, a, b) in enumerate(zip(prompts, outs_a, outs_b, strict=False)):
        d = first_difference(a, b) if p and a and b else None
        if d is not None and d < min(len(a), len(b)):
            todo.append((i, list(p) + list(a[:d]), d))
    if not todo:
        return []
    from llama_relax.models import open_model

    m = open_model(model, cache_dir=cache_dir, quiet=True)
    try:
        out = []
        for seq, (i, ids, d) in enumerate(todo):
            m.runtime.add_sequence(seq)
            logits = m.runtime.prefill([seq], [ids])[0]  # [V]
            m.runtime.remove_sequence(seq)
            top2 = np.partition(logits, -2)[-2:]
            out.append(Mismatch(i, d, float(abs(top2[1] - top2[0]))))
        return out
    finally:
        m.close()


def mismatch_line(found: Sequence[Mismatch], compared: int) -> str:
    ties = [x for x in found if x.near_tie]
    line = f"Token mismatches: {len(found)}/{compared} requests; near-ties (top-2 margin < {TIE:g}): {len(ties)}"
    others = [x for x in found if not x.near_tie]
    if others:
        worst = ", ".join(f"request {x.request} at token {x.position} (margin {x.margin:.3g})" for x in others[:5])
        line += f"; NOT near-ties: {len(others)} ({worst})"
    return line
