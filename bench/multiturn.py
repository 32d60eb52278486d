"""The `multiturn` workload: chat conversations that repeat themselves, as prefix caches expect.

N conversations of T turns share one system prompt. Turn k's prompt is the system prompt plus every earlier
user message and answer, plus a new user message (random token ids; lengths uniform in
[max(1, int(len * (1 - range_ratio))), len], vLLM's range convention). A conversation sends its next turn only
after the previous answer arrived, as a chat user does; conversations start at the run's arrival offsets.
Defaults are the prefix-caching target workload: 8 x 4 turns, a 256-token system prompt, 64-token user
messages, 32-token answers.

Call order: `build_conversations(spec, vocab, context)` once per bench (the same conversations for every
server) -> `run_conversations(client, conversations, offsets)` per server and rate. Records come back
conversation-major (conversation i, turn k at index i * T + k), so two servers' records pair up one to one."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from bench.client import BenchClient, RunResult
from bench.stats import RequestRecord
from bench.workload import BenchRequest

MULTITURN_STREAM = 2  # seed stream id, distinct from the workload's and the arrivals'


@dataclass(frozen=True)
class MultiturnSpec:
    conversations: int = 8
    turns: int = 4
    system_len: int = 256
    user_len: int = 64
    answer_len: int = 32
    range_ratio: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("conversations", "turns", "user_len", "answer_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.system_len < 0:
            raise ValueError(f"--system-len must be >= 0, got {self.system_len}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")

    @property
    def max_tokens(self) -> int:
        """The longest context a conversation reaches: every turn at its longest."""
        return self.system_len + self.turns * (self.user_len + self.answer_len)


@dataclass(frozen=True)
class Conversation:
    system: tuple[int, ...]
    users: tuple[tuple[int, ...], ...]  # one message per turn
    answer_lens: tuple[int, ...]  # max_tokens of each turn


def build_conversations(spec: MultiturnSpec, vocab_size: int, context_window: int) -> tuple[Conversation, ...]:
    if spec.max_tokens > context_window:
        raise ValueError(
            f"a {spec.turns}-turn conversation reaches {spec.max_tokens} tokens, more than the model's context "
            f"window of {context_window}: lower --turns, --system-len, --input-len or --output-len"
        )
    rng = np.random.default_rng([spec.seed, MULTITURN_STREAM])
    system = tuple(int(t) for t in rng.integers(0, vocab_size, spec.system_len))

    def lengths(n: int) -> list[int]:
        return [int(x) for x in rng.integers(max(1, int(n * (1.0 - spec.range_ratio))), n + 1, spec.turns)]

    out = []
    for _ in range(spec.conversations):
        users = tuple(tuple(int(t) for t in rng.integers(0, vocab_size, n)) for n in lengths(spec.user_len))
        out.append(Conversation(system, users, tuple(lengths(spec.answer_len))))
    return tuple(out)


def run_conversations(
    client: BenchClient, conversations: Sequence[Conversation], offsets: Sequence[float], desc: str = ""
) -> RunResult:
    """Every conversation on a thread of its own, starting at its offset; a failed turn ends its conversation
    (the turns it did not send are recorded as NOT_SENT failures)."""
    if len(conversations) != len(offsets):
        raise ValueError(f"{len(conversations)} conversations but {len(offsets)} start offsets")
    turns = len(conversations[0].users) if conversations else 0
    records: list[RequestRecord | None] = [None] * (len(conversations) * turns)
    bar = tqdm(
        total=len(records),
        desc=desc or None,
        unit="req",
        file=sys.stderr,
        disable=not client.options.progress,
        dynamic_ncols=True,
    )
    start = time.perf_counter()

    def talk(i: int, conv: Conversation, offset: float) -> None:
        time.sleep(max(0.0, start + offset - time.perf_counter()))
        history = conv.system
        for k, (user, answer_len) in enumerate(zip(conv.users, conv.answer_lens, strict=True)):
            prompt = history + user
            rec = client.one(BenchRequest(len(prompt), answer_len, prompt), bar)
            records[i * turns + k] = rec
            if not rec.ok:
                now = time.perf_counter()
                for rest in range(k + 1, turns):
                    why = f"turn {k} failed ({rec.error})"
                    records[i * turns + rest] = RequestRecord(
                        now, now, target_output_len=0, error="NOT_SENT", error_detail=why
                    )
                return
            history = prompt + rec.output_ids

    threads = [
        threading.Thread(target=talk, args=(i, c, float(off)), name=f"conversation-{i}", daemon=True)
        for i, (c, off) in enumerate(zip(conversations, offsets, strict=True))
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        bar.close()
    done = tuple(r for r in records if r is not None)
    end = max((r.done for r in done), default=start)
    return RunResult(done, max(end - start, 1e-9), start)


def same_tokens(a: Sequence[RequestRecord], b: Sequence[RequestRecord]) -> tuple[int, int]:
    """(requests whose streamed tokens are identical on both servers, requests completed on both)."""
    both = [(x, y) for x, y in zip(a, b, strict=False) if x.ok and y.ok]
    return sum(x.output_ids == y.output_ids for x, y in both), len(both)
