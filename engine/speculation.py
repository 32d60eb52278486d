"""Draftless speculative decoding: draft tokens from the sequence's own text, verify them all in one forward.

Drafting (prompt lookup): `NgramDrafter` indexes every n-gram (n = `min_n`..`max_n`) of a sequence's tokens
(prompt and output) with the position that followed its latest occurrence; the draft is what followed the most
recent earlier occurrence of the longest n-gram the sequence now ends with. No draft model, O(1) per token.

Verification (`accept`): the forward appends `[last token, d_0, .., d_{k-1}]` and gives one logits row per input.
Row j is sampled exactly as a plain decode step would sample output token `step + j` (sampling is keyed by
(seed, step)), so greedy and seeded output equal non-speculative decoding token for token and no
rejection-sampling correction is needed. The longest prefix of the draft that equals the sampled tokens is
accepted, plus the next sampled token; a stop condition (stop id or string, `max_tokens`, the context window)
inside the run ends it there. The caller rolls the rejected inputs back (`ModelRuntime.popn`).

Call order (engine thread): `drafter.sync(prompt, output)` -> `drafter.propose(k)` -> the batch verifies ->
`accept(decoder, rows, draft)` -> the caller keeps `kept` inputs in the cache and streams `events`."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llama_relax.generation import SequenceDecoder, TokenEvent


class SpecMode(enum.Enum):
    """`--speculative`: `off` decodes one token per step; `ngram` drafts by prompt lookup."""

    OFF = "off"
    NGRAM = "ngram"


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


@dataclass(frozen=True)
class Verified:
    """The outcome of one sequence's verification: the tokens to stream (the last may finish the request), how
    many inputs of the forward stay in the cache (`1 + accepted`), and how many draft tokens were accepted."""

    events: list[TokenEvent]
    kept: int
    accepted: int


def accept(decoder: SequenceDecoder, rows: np.ndarray, draft: Sequence[int]) -> Verified:
    """Sample `rows` ([len(draft) + 1, V]: row j follows input j) in order, as plain decode steps would, while
    each sampled token equals the draft token that was fed after it."""
    if len(rows) != len(draft) + 1:
        raise ValueError(f"verify gave {len(rows)} logits rows for a draft of {len(draft)} tokens")
    events: list[TokenEvent] = []
    for j, row in enumerate(rows):
        event = decoder.sample_and_append(row)
        events.append(event)
        if event.finish_reason is not None or j == len(draft) or event.token_id != draft[j]:
            return Verified(events, kept=j + 1, accepted=j)
    raise AssertionError("unreachable: the last row always ends the run")
