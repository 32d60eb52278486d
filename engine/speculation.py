"""Draftless speculative decoding: draft tokens from the sequence's own text, verify them all in one forward.

Drafting (prompt lookup): `NgramDrafter` indexes every n-gram (n = `min_n`..`max_n`) of a sequence's tokens
(prompt and output) with the position that followed its latest occurrence; the draft is what followed the most
recent earlier occurrence of the longest n-gram the sequence now ends with. No draft model, O(1) per token.

Verification (`verify_rounds`): the forward appends `[last token, d_0, .., d_{k-1}]`; row j of the logits follows
input j and is computed only if every earlier draft token was accepted.
Row j is sampled exactly as a plain decode step would sample output token `step + j` (sampling is keyed by
(seed, step)), so greedy and seeded output equal non-speculative decoding token for token and no
rejection-sampling correction is needed. The longest prefix of the draft that equals the sampled tokens is
accepted, plus the next sampled token; a stop condition (stop id or string, `max_tokens`, the context window)
inside the run ends it there. The caller rolls the rejected inputs back (`ModelRuntime.popn`).

Call order (engine thread): `drafter.sync(prompt, output)` -> `drafter.propose(k)` -> one forward appends every
sequence's inputs (hidden states only) -> `verify_rounds` computes logits rows as acceptance needs them and streams
each token -> the caller keeps `kept` inputs in the cache and pops the rest."""

from __future__ import annotations

import enum
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from llama_relax.generation import SequenceDecoder, TokenEvent
from llama_relax.spec_cost import StepCost


class SpecMode(enum.Enum):
    """`--speculative`: `off` decodes one token per step; `ngram` drafts by prompt lookup (the whole draft, every
    step); `suffix` adds the worker's index of recent outputs when the sequence's own text has no match; `auto`
    (the serving default) drafts as `suffix` does and sizes each draft by its expected gain against the measured
    cost of a verify step (`llama_relax.spec_cost`), decoding plainly when no draft pays."""

    OFF = "off"
    NGRAM = "ngram"
    SUFFIX = "suffix"
    AUTO = "auto"

    @property
    def uses_index(self) -> bool:
        return self in (SpecMode.SUFFIX, SpecMode.AUTO)


class NgramDrafter:
    """Prompt-lookup drafts for one sequence. Memory: one dict entry per (position, n); owned by its sequence."""

    def __init__(self, max_n: int = 4, min_n: int = 2) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> the position of the token that followed it last

    def sync(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        """Take in the tokens of `prompt + output` not seen yet (both only ever grow)."""
        n = len(self.tokens)
        if n < len(prompt):
            self.extend(prompt[n:])
            n = len(prompt)
        if n - len(prompt) < len(output):
            self.extend(output[n - len(prompt) :])

    def extend(self, tokens: Sequence[int]) -> None:
        h = self.tokens
        for t in tokens:
            i = len(h)
            h.append(int(t))
            for n in range(self.min_n, min(self.max_n, i) + 1):
                self._next[tuple(h[i - n : i])] = i

    def propose(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest matching suffix ([]: none)."""
        h, end = self.tokens, len(self.tokens)
        if k <= 0:
            return []
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            p = self._next.get(tuple(h[end - n :]))
            if p is not None:  # p < end: the current suffix has no follower yet
                return h[p : min(p + k, end)]
        return []


class SuffixIndex:
    """Worker-wide drafts from recent outputs: every n-gram of the last `max_tokens` generated tokens (whole
    sequences, oldest dropped first) -> where its latest occurrence continued. For text the sequence's own tokens do
    not hold: an agent or a template that repeats what earlier requests produced.

    Memory: at most `max_tokens` tokens and `(max_n - min_n + 1)` entries per token; owned by one engine (its
    thread only). Call order: `add(output)` when a sequence finishes -> `propose(context, k)` per step."""

    def __init__(self, max_tokens: int = 1 << 16, max_n: int = 4, min_n: int = 2) -> None:
        self.max_tokens, self.max_n, self.min_n = max_tokens, max_n, min_n
        self._docs: deque[tuple[int, list[int]]] = deque()  # (document number, tokens), oldest first
        self._next: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (document, position after it)
        self._count = 0  # documents ever added
        self.tokens = 0  # tokens held

    def add(self, tokens: Sequence[int]) -> None:
        toks = [int(t) for t in tokens[-self.max_tokens :]]
        if len(toks) <= self.min_n:
            return
        doc = self._count
        self._count += 1
        self._docs.append((doc, toks))
        self.tokens += len(toks)
        for i in range(self.min_n, len(toks)):
            for n in range(self.min_n, min(self.max_n, i) + 1):
                self._next[tuple(toks[i - n : i])] = (doc, i)
        while self.tokens > self.max_tokens:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        doc, toks = self._docs.popleft()
        self.tokens -= len(toks)
        for i in range(self.min_n, len(toks)):
            for n in range(self.min_n, min(self.max_n, i) + 1):
                key = tuple(toks[i - n : i])
                if self._next.get(key, (None,))[0] == doc:
                    del self._next[key]

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the longest suffix of `context` in an indexed output ([]: none)."""
        if k <= 0 or not self._next:
            return []
        first = self._docs[0][0]
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            hit = self._next.get(tuple(context[len(context) - n :]))
            if hit is not None:
                doc, pos = hit
                toks = self._docs[doc - first][1]
                return toks[pos : pos + k]
        return []


@dataclass
class Acceptance:
    """A sequence's running acceptance: each draft token is taken to be accepted with probability `rate`
    (geometric: a run ends at the first rejection), estimated from its own steps with a prior of one accepted
    and one rejected token, older steps decaying by `DECAY` per step."""

    accepted: float = 0.0
    rejected: float = 0.0

    DECAY = 0.9

    @property
    def rate(self) -> float:
        return (self.accepted + 1.0) / (self.accepted + self.rejected + 2.0)

    def update(self, drafted: int, accepted: int, finished: bool) -> None:
        self.accepted = self.accepted * self.DECAY + accepted
        self.rejected = self.rejected * self.DECAY + (1.0 if accepted < drafted and not finished else 0.0)


def choose_drafts(cost: StepCost, drafts: Sequence[Sequence[int]], rates: Sequence[float]) -> list[int]:
    """How many tokens of each sequence's draft the next step verifies (all 0: a plain decode step).

    The j-th draft token of sequence i adds `rates[i] ** j` expected tokens (it counts only if the j - 1 before it
    were accepted). Taking draft tokens best first, the step keeps the prefix that maximises expected tokens per
    second: `(b + gains) / cost.verify(b, b + taken, b + gains)` against `b / cost.decode(b)`."""
    b = len(drafts)
    gains = sorted(((rates[i] ** (j + 1), i) for i, d in enumerate(drafts) for j in range(len(d))), key=lambda g: -g[0])
    best_t, best = 0, b / cost.decode(b)
    rows = float(b)
    for t, (g, _i) in enumerate(gains, 1):
        rows += g
        rate = rows / cost.verify(b, b + t, rows)
        if rate > best:
            best, best_t = rate, t
    take = Counter(i for _, i in gains[:best_t])
    return [take[i] for i in range(b)]


@dataclass(frozen=True)
class Verified:
    """The outcome of one sequence's verification: the tokens to stream (the last may finish the request), how
    many inputs of the forward stay in the cache (`1 + accepted`), and how many draft tokens were accepted."""

    events: list[TokenEvent]
    kept: int
    accepted: int


# (sequence index, row j) pairs -> their logits [len(pairs), V]; row j follows input j of that sequence
RowLogits = Callable[[list[tuple[int, int]]], np.ndarray]


def verify_rounds(
    decoders: Sequence[SequenceDecoder],
    drafts: Sequence[Sequence[int]],
    logits: RowLogits,
    emit: Callable[[int, TokenEvent], None] = lambda i, e: None,
    first: Sequence[int] | None = None,
) -> list[Verified]:
    """Accept each sequence's longest matching draft prefix plus one, computing only the logits rows it may need.

    Rows are sampled in order, exactly as plain decode steps `step`, `step + 1`, .. would sample them, and each
    token is `emit`ted at once (streaming). A sequence stops at its first mismatch, at the end of its draft, or
    when a stop condition (stop id or string, `max_tokens`, the context window) ends it. The LM head runs in at
    most two calls for the whole batch: the first computes `first[i]` rows of sequence i (default 1: row 0), the
    second the rest of the drafts whose first rows were all accepted, so a rejected draft costs little LM head."""
    events: list[list[TokenEvent]] = [[] for _ in decoders]
    want = [max(1, min(f, len(d) + 1)) for f, d in zip(first or [1] * len(drafts), drafts, strict=True)]
    alive = list(range(len(decoders)))
    while alive:
        pairs = [(i, len(events[i]) + r) for i in alive for r in range(want[i])]
        rows = logits(pairs)  # [len(pairs), V]
        if len(rows) != len(pairs):
            raise ValueError(f"verify gave {len(rows)} logits rows for {len(pairs)}")
        still, at = [], 0
        for i in alive:
            d = drafts[i]
            for row in rows[at : at + want[i]]:
                j = len(events[i])
                event = decoders[i].sample_and_append(row)
                go_on = event.finish_reason is None and j < len(d) and event.token_id == d[j]
                if not go_on and d:  # the run's last token carries the step's draft and accepted counts
                    event = replace(event, drafted=len(d), accepted=j)
                events[i].append(event)
                emit(i, event)
                if not go_on:
                    break
            else:
                still.append(i)
            at += want[i]
        alive = still
        for i in alive:
            want[i] = len(drafts[i]) + 1 - len(events[i])
    return [Verified(e, kept=len(e), accepted=len(e) - 1) for e in events]


def first_rows(rate: float, draft_len: int) -> int:
    """Rows the first LM-head call computes: row 0, and each draft row at least as likely needed as not."""
    n = 1
    while n <= draft_len and rate**n >= 0.5:
        n += 1
    return n


def accept(decoder: SequenceDecoder, rows: np.ndarray, draft: Sequence[int]) -> Verified:
    """One sequence's `verify_rounds` over precomputed `rows` ([len(draft) + 1, V]: row j follows input j)."""
    if len(rows) != len(draft) + 1:
        raise ValueError(f"verify gave {len(rows)} logits rows for a draft of {len(draft)} tokens")
    return verify_rounds([decoder], [draft], lambda pairs: rows[[j for _, j in pairs]])[0]
