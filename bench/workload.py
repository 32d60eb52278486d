"""Benchmark workloads: the list of requests (prompt + target output length), reproducible from a seed.

- `random`: prompt and output lengths uniform in [max(1, int(len * (1 - range_ratio))), len] (vLLM's
  `--random-range-ratio` convention); `long_fraction` of the requests (exactly round(F * n), at seeded positions)
  take their prompt length from `long_input_len` instead. Prompts are random token ids in [0, vocab).
- `fixed`: every request has exactly `input_len` prompt tokens (random ids) and `output_len` output tokens.
- `grounded`: code-edit and quote-back prompts from the standard library's sources (`bench.grounded`), text.
- `sharegpt`: a ShareGPT JSON file; the first human turn is the prompt (sent as text) and the token length of the
  gpt reply that follows is the target output length. Lengths are counted with the model's tokenizer when one is
  given (`--model`), otherwise approximated as round(1.3 * words). Malformed entries are skipped and counted, so
  are entries whose prompt + output (+1 for a BOS) would not fit the context window. Prompt token counts in the
  results come from the server's usage (exact either way).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Dataset = Literal["random", "fixed", "sharegpt", "multiturn", "grounded"]
# multiturn: bench.multiturn; grounded: bench.grounded
DATASETS: tuple[Dataset, ...] = ("random", "fixed", "sharegpt", "multiturn", "grounded")
WORKLOAD_STREAM = 0  # seed stream id, distinct from the arrivals'
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "chatgpt", "assistant", "model")
TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class BenchRequest:
    """One request: token ids (random/fixed) or text (sharegpt), its prompt length and target output length."""

    prompt_len: int
    output_len: int
    token_ids: tuple[int, ...] = ()
    text: str | None = None
    chat: bool = False  # the text is one user message: the server applies the model's chat template


@dataclass(frozen=True)
class WorkloadSpec:
    dataset: Dataset = "random"
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    long_fraction: float = 0.0
    long_input_len: int = 0
    dataset_path: Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"--input-len/--output-len must be >= 1, got {self.input_len}/{self.output_len}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError(f"--long-fraction must be in [0, 1], got {self.long_fraction}")
        if self.long_fraction > 0 and self.long_input_len < 1:
            raise ValueError("--long-fraction needs --long-input-len >= 1")
        if self.long_fraction > 0 and self.dataset != "random":
            raise ValueError("--long-fraction applies to --dataset random only")
        if (self.dataset == "sharegpt") != (self.dataset_path is not None):
            raise ValueError("--dataset-path is required with --dataset sharegpt (and only then)")


@dataclass(frozen=True)
class Workload:
    requests: tuple[BenchRequest, ...]
    skipped_malformed: int = 0  # sharegpt entries without a usable human -> gpt pair
    skipped_too_long: int = 0  # sharegpt entries that would not fit the context window
    length_source: str = "exact"  # how sharegpt lengths were counted: "tokenizer" or "words*1.3"

    @property
    def total_prompt_tokens(self) -> int:
        return sum(r.prompt_len for r in self.requests)

    @property
    def total_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)


@dataclass(frozen=True)
class WorkloadSummary:
    """What results.json records of the requests (the seed regenerates them)."""

    num_requests: int
    total_prompt_tokens: int
    total_target_output_tokens: int
    prompt_lens: tuple[int, ...]
    output_lens: tuple[int, ...]
    skipped_malformed: int
    skipped_too_long: int
    length_source: str

    @classmethod
    def of(cls, w: Workload) -> WorkloadSummary:
        return cls(
            len(w.requests),
            w.total_prompt_tokens,
            w.total_output_tokens,
            tuple(r.prompt_len for r in w.requests),
            tuple(r.output_len for r in w.requests),
            w.skipped_malformed,
            w.skipped_too_long,
            w.length_source,
        )


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, WORKLOAD_STREAM])


def _lengths(rng: np.random.Generator, length: int, ratio: float, n: int) -> np.ndarray:
    low = max(1, int(length * (1.0 - ratio)))
    return rng.integers(low, length + 1, size=n)


def random_requests(spec: WorkloadSpec, vocab_size: int, context_window: int) -> Workload:
    """`random` (or `fixed`, where the range ratio is ignored) workload of random token-id prompts."""
    if vocab_size < 1:
        raise ValueError(f"the server reported vocab_size {vocab_size}")
    ratio = 0.0 if spec.dataset == "fixed" else spec.range_ratio
    longest = max(spec.input_len, spec.long_input_len if spec.long_fraction > 0 else 0)
    if longest + spec.output_len > context_window:
        raise ValueError(
            f"input length {longest} + output length {spec.output_len} exceeds the model's context window "
            f"({context_window})"
        )
    rng = _rng(spec.seed)
    n = spec.num_prompts
    in_lens = _lengths(rng, spec.input_len, ratio, n)
    out_lens = _lengths(rng, spec.output_len, ratio, n)
    n_long = round(spec.long_fraction * n)
    if n_long:
        where = rng.choice(n, size=n_long, replace=False)
        in_lens[where] = _lengths(rng, spec.long_input_len, ratio, n_long)
    reqs = tuple(
        BenchRequest(int(i), int(o), tuple(int(t) for t in rng.integers(0, vocab_size, size=int(i))))
        for i, o in zip(in_lens, out_lens, strict=True)
    )
    return Workload(reqs)


def approx_tokens(text: str) -> int:
    """Token count estimate without a tokenizer: 1.3 tokens per whitespace-separated word."""
    return max(1, round(1.3 * len(text.split())))


def _first_pair(entry: object) -> tuple[str, str] | None:
    """The first human turn and the gpt reply right after it, or None when the entry is malformed."""
    if not isinstance(entry, dict):
        return None
    turns = entry.get("conversations", entry.get("conversation"))
    if not isinstance(turns, list):
        return None
    for a, b in itertools.pairwise(turns):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return None
        if a.get("from") in HUMAN_ROLES and b.get("from") in GPT_ROLES:
            prompt, reply = a.get("value"), b.get("value")
            if isinstance(prompt, str) and isinstance(reply, str) and prompt.strip() and reply.strip():
                return prompt, reply
            return None
    return None


def parse_sharegpt(
    entries: Sequence[object], context_window: int, count: TokenCounter | None = None
) -> tuple[list[BenchRequest], int, int]:
    """(requests, malformed, too long) from parsed ShareGPT entries, in file order."""
    count = count or approx_tokens
    reqs: list[BenchRequest] = []
    malformed = too_long = 0
    for entry in entries:
        pair = _first_pair(entry)
        if pair is None:
            malformed += 1
            continue
        prompt_len, output_len = count(pair[0]), count(pair[1])
        if output_len < 1 or prompt_len < 1:
            malformed += 1
        elif prompt_len + output_len + 1 > context_window:  # +1: room for a BOS the server may add
            too_long += 1
        else:
            reqs.append(BenchRequest(prompt_len, output_len, text=pair[0]))
    return reqs, malformed, too_long


def sharegpt_requests(spec: WorkloadSpec, context_window: int, count: TokenCounter | None = None) -> Workload:
    """`num_prompts` usable entries of the file, shuffled with the seed (fewer if the file has fewer)."""
    assert spec.dataset_path is not None
    try:
        data = json.loads(Path(spec.dataset_path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--dataset-path {spec.dataset_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise ValueError(f"--dataset-path {spec.dataset_path}: expected a JSON list of conversations")
    reqs, malformed, too_long = parse_sharegpt(data, context_window, count)
    if not reqs:
        raise ValueError(
            f"--dataset-path {spec.dataset_path}: no usable conversations ({malformed} malformed, "
            f"{too_long} longer than the context window {context_window})"
        )
    order = _rng(spec.seed).permutation(len(reqs))[: spec.num_prompts]
    return Workload(tuple(reqs[i] for i in order), malformed, too_long, "tokenizer" if count else "words*1.3")


def build_workload(
    spec: WorkloadSpec, vocab_size: int, context_window: int, count: TokenCounter | None = None
) -> Workload:
    if spec.dataset == "sharegpt":
        return sharegpt_requests(spec, context_window, count)
    if spec.dataset == "grounded":
        from bench.grounded import grounded_requests

        return grounded_requests(spec, context_window, count)
    return random_requests(spec, vocab_size, context_window)


def _tokenizer(model_path: str | Path):
    from llama_relax.loader import resolve_model
    from llama_relax.models import load_tokenizer

    tok = load_tokenizer(resolve_model(model_path))
    if tok is None:
        raise ValueError(f"--model {model_path}: this model has no tokenizer (needed for text prompt lengths)")
    return tok


def tokenizer_counter(model_path: str | Path) -> TokenCounter:
    """Token counts with the model's tokenizer (no BOS), loaded locally from `model_path`."""
    tok = _tokenizer(model_path)
    return lambda text: len(tok.encode(text, add_bos=False))


def tokenizer_text(model_path: str | Path) -> Callable[[Sequence[int]], str]:
    """Token ids -> text with the model's tokenizer (chat backends send token-id workloads as text)."""
    tok = _tokenizer(model_path)
    return lambda ids: tok.decode(ids, skip_special=True)
