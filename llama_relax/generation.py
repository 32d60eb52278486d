"""Per-sequence generation state (sampling, streaming detokenization, stop conditions) and a one-sequence loop.

`SequenceDecoder` is what an engine keeps per running request: feed it each sampled token with `append`, and it
returns the text delta to stream and whether the sequence is finished. Stop strings are matched on the text;
text that could still become a stop string is held back until it cannot, and the stop string itself is never
emitted. `generate` drives one sequence through a `ModelRuntime` (the local CLI's path).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from llama_relax.sampling import Sampler, SamplingParams, TokenLogprob, log_softmax, top_logprobs


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"


class Detokenizer(Protocol):
    def push(self, token_id: int) -> str: ...


class TokenizerLike(Protocol):
    eos_token_ids: set[int]

    def stream_decoder(self) -> Detokenizer: ...


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: its id, the text it adds, its top logprobs, and the finish reason if it was the last."""

    token_id: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    logprob: float | None = None  # the chosen token's own logprob (when logprobs were asked for)
    # speculative decoding, on the last token of a verified run only: draft tokens verified, and accepted
    drafted: int = 0
    accepted: int = 0


class SequenceDecoder:
    """Sampling + stop logic for one sequence. Not thread-safe; one per request."""

    def __init__(
        self,
        params: SamplingParams,
        tokenizer: TokenizerLike | None,
        prompt_len: int,
        context_window: int,
        eos_token_ids: set[int] | None = None,
    ) -> None:
        self.params = params
        self.sampler = Sampler(params)
        self.detok = tokenizer.stream_decoder() if tokenizer is not None else None
        eos = set(eos_token_ids if eos_token_ids is not None else (tokenizer.eos_token_ids if tokenizer else set()))
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos)
        self.prompt_len = prompt_len
        self.context_window = context_window
        self.output_ids: list[int] = []
        self._pending = ""  # decoded text not yet emitted (could be the start of a stop string)
        self.finish_reason: FinishReason | None = None

    def sample_and_append(self, logits: np.ndarray) -> TokenEvent:
        """Sample from logits [V], record the token, and return its event."""
        token = self.sampler.sample(logits, len(self.output_ids))
        if self.params.logprobs <= 0:
            return self.append(token)
        lps = tuple(top_logprobs(logits, self.params.logprobs))
        return self.append(token, lps, float(log_softmax(logits)[token]))

    def append(self, token: int, logprobs: tuple[TokenLogprob, ...] = (), logprob: float | None = None) -> TokenEvent:
        assert self.finish_reason is None, "sequence already finished"
        self.output_ids.append(token)
        text = ""
        if token in self.stop_ids:
            self.finish_reason = FinishReason.STOP
            text, self._pending = self._pending + self._flush(), ""
            return TokenEvent(token, text, logprobs, self.finish_reason, logprob)
        if self.detok is not None:
            self._pending += self.detok.push(token)
            text = self._release()
        if self.finish_reason is None and (
            len(self.output_ids) >= self.params.max_tokens
            or self.prompt_len + len(self.output_ids) >= self.context_window
        ):
            self.finish_reason = FinishReason.LENGTH
            text += self._pending + self._flush()
            self._pending = ""
        return TokenEvent(token, text, logprobs, self.finish_reason, logprob)

    def _flush(self) -> str:
        """Bytes the detokenizer still holds (an incomplete character at the very end)."""
        flush = getattr(self.detok, "flush", None)
        return flush() if flush is not None else ""

    def _release(self) -> str:
        """Emit pending text up to a stop string (and finish), or up to where a stop string might begin."""
        stops = self.params.stop
        if not stops:
            out, self._pending = self._pending, ""
            return out
        hits = [(i, s) for s in stops if (i := self._pending.find(s)) >= 0]
        if hits:
            i = min(i for i, _ in hits)
            self.finish_reason = FinishReason.STOP
            out, self._pending = self._pending[:i], ""
            return out
        hold = 0
        for s in stops:  # longest suffix of pending that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out


def generate(
    runtime,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    tokenizer: TokenizerLike | None = None,
    seq_id: int = 0,
) -> Iterator[TokenEvent]:
    """Generate for one sequence, streaming events. The sequence is removed from the cache in `finally`."""
    state = SequenceDecoder(params, tokenizer, len(prompt_ids), runtime.config.context_window_size)
    runtime.add_sequence(seq_id)
    try:
        logits = runtime.prefill([seq_id], [list(prompt_ids)])[0]
        while True:
            event = state.sample_and_append(logits)
            yield event
            if event.finish_reason is not None:
                return
            logits = runtime.decode([seq_id], [event.token_id])[0]
    finally:
        runtime.remove_sequence(seq_id)
