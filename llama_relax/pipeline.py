"""Pipeline stages run one after another in this process: each stage a `ModelRuntime` over its own stage library
(`stage_model`), its own weights (only its tensors are read) and its own KV cache (only its layers).

The hand-off between stages is the hidden states of the forward's tokens; every stage appends the same tokens to
the same sequences. This is the reference composition the stage actors are checked against.

Call order: `open_pipeline(path, stages, ...)` -> `add_sequence` -> `prefill` / `decode` -> `remove_sequence` ->
`close`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llama_relax.compile import TargetSpec, compile_model, resolve_target
from llama_relax.config import LlamaConfig
from llama_relax.kv_dtype import resolve_kv_dtype
from llama_relax.loader import ModelSource, load_config, quant_plan, resolve_model, stream_params
from llama_relax.loader.mapping import expected_param_shapes
from llama_relax.runtime import KVCacheConfig, ModelRuntime, plan_prefill_chunks, prompt_ends
from llama_relax.stage_model import StageSpec


def stage_weight_names(config: LlamaConfig, stage: StageSpec) -> set[str]:
    """The checkpoint weights one stage reads: its layers, the embedding table where it is held
    (`StageSpec.holds_table`), the final norm and LM head on the last."""
    layers = stage.layers(config)
    names = set()
    for name in expected_param_shapes(config):
        if name.startswith("model.layers."):
            if int(name.split(".")[2]) in layers:
                names.add(name)
        elif name == "model.embed_tokens.weight":
            if stage.holds_table(config):
                names.add(name)
        elif stage.last:
            names.add(name)
    return names


def open_stage(
    src: ModelSource,
    stage: StageSpec,
    *,
    dtype: str = "float32",
    target: TargetSpec,
    cache_dir: Path,
    kv: KVCacheConfig,
    quantization: str = "auto",
    kv_cache_dtype: str = "auto",
    quiet: bool = True,
) -> ModelRuntime:
    """Compile (or reuse) the stage's library and stream only its weights into a runtime of its own."""
    config = load_config(src)
    plan = quant_plan(src, config, quantization, target.kind)
    kv_dtype = resolve_kv_dtype(kv_cache_dtype, dtype, target.kind)
    compiled = compile_model(
        config, dtype, target, cache_dir=cache_dir, quiet=quiet, plan=plan, kv_dtype=kv_dtype, stage=stage
    )
    to_local = {stage.global_name(config, n): n for n in _weight_prefixes(compiled.param_names)}
    stream = stream_params(src, config, dtype, plan=plan, only=stage_weight_names(config, stage))
    params = ((_rename(name, to_local), array) for name, array in stream)
    return ModelRuntime(compiled, params, kv)


def _weight_prefixes(param_names: Sequence[str]) -> set[str]:
    """Weight names of a library's parameters (a quantized weight's arrays share `<weight>.qweight` etc.)."""
    return {n.rsplit(".", 1)[0] if n.endswith((".qweight", ".scale", ".zero")) else n for n in param_names}


def _rename(name: str, to_local: dict[str, str]) -> str:
    base, _, suffix = name.rpartition(".")
    if name in to_local:
        return to_local[name]
    return f"{to_local[base]}.{suffix}" if base in to_local else name


class StageChain:
    """Stages in order, however they are reached: appends tokens to sequences through every stage, handing each
    the previous one's hidden states, and turns the last stage's rows into logits. Subclasses say how one stage is
    called (`_stage`) and how many there are; this class holds the prefill packing and the decode step."""

    num_stages: int
    vocab_size: int
    prefill_chunk: int
    embedding_stage: int  # the stage that looks ids up (`LlamaConfig.embedding_stage`)

    def _stage(self, i: int, seq_ids: Sequence[int], lengths: Sequence[int], x, rows: Sequence[int]):
        """Stage `i`'s forward of `x` (token ids on stage 0, else the previous stage's output); the last stage
        returns float32 logits [len(rows), V] of those rows, the others their hidden states."""
        raise NotImplementedError

    def _embed(self, ids: np.ndarray):
        """The embedding stage's rows of `ids` ([n, h]): stage 0's input when another stage embeds."""
        raise NotImplementedError

    def _first_input(self, ids: np.ndarray):
        """Stage 0's input: the ids, or their embeddings when another stage holds the table."""
        return ids if self.embedding_stage == 0 else self._embed(ids)

    def _forward(self, seq_ids: Sequence[int], chunks: Sequence[Sequence[int]], rows: Sequence[int]) -> np.ndarray:
        lengths = [len(c) for c in chunks]
        ids = np.fromiter((t for c in chunks for t in c), dtype=np.int32, count=sum(lengths))
        x = self._first_input(ids)
        for i in range(self.num_stages):
            x = self._stage(i, seq_ids, lengths, x, rows)
        return x

    def prefill(self, seq_ids: Sequence[int], token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Float32 logits of each prompt's last token, [b, V] (prompts packed into prefill-chunk forwards)."""
        out = np.empty((len(seq_ids), self.vocab_size), np.float32)
        for batch in plan_prefill_chunks([len(t) for t in token_lists], self.prefill_chunk):
            chunks = [token_lists[i][a:b] for i, a, b in batch]
            ends, rows = prompt_ends(batch, token_lists)
            logits = self._forward([seq_ids[i] for i, _, _ in batch], chunks, ends)
            if rows:
                out[rows] = logits
        return out

    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One token per sequence through every stage; float32 logits [b, V]."""
        return self._forward(seq_ids, [[t] for t in tokens], list(range(len(seq_ids))))


class LocalPipeline(StageChain):
    """Every stage a `ModelRuntime` in this process (the reference the remote stages are checked against)."""

    def __init__(self, stages: list[ModelRuntime]) -> None:
        self.stages = stages
        self.num_stages = len(stages)
        self.vocab_size = stages[0].config.vocab_size
        self.prefill_chunk = min(rt.prefill_chunk_size for rt in stages)
        self.embedding_stage = self.config.embedding_stage(len(stages))

    def _embed(self, ids: np.ndarray):
        return self.stages[self.embedding_stage].embed(ids)

    @property
    def config(self) -> LlamaConfig:
        return self.stages[0].config

    def _stage(self, i: int, seq_ids: Sequence[int], lengths: Sequence[int], x, rows: Sequence[int]):
        hidden = self.stages[i].stage_forward(seq_ids, lengths, x)
        return self.stages[i].logits_at(hidden, rows) if i == self.num_stages - 1 else hidden

    def add_sequence(self, seq_id: int) -> None:
        for rt in self.stages:
            rt.add_sequence(seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        for rt in self.stages:
            rt.remove_sequence(seq_id)

    def read_kv(self, seq_id: int, begin: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V of tokens [begin, end) over every layer, [L, n, Hkv, d]: each stage's layers, in order."""
        parts = [rt.read_kv(seq_id, begin, end) for rt in self.stages]
        return np.concatenate([k for k, _ in parts]), np.concatenate([v for _, v in parts])

    def append_kv(self, seq_id: int, k: np.ndarray, v: np.ndarray) -> None:
        """Append tokens' K and V of every layer ([L, n, Hkv, d], e.g. from a one-stage prefill worker): each stage
        imports only its own layers."""
        ranges = self.config.layer_ranges(len(self.stages))
        for rt, layers in zip(self.stages, ranges, strict=True):
            rt.append_kv(seq_id, k[layers.start : layers.stop], v[layers.start : layers.stop])

    def close(self) -> None:
        for rt in self.stages:
            rt.close()


def open_pipeline(path: str | Path, stages: int, *, cache_dir: Path, kv: KVCacheConfig, **kw) -> LocalPipeline:
    """Every stage of `path` split into `stages`, each opened with `open_stage`."""
    src = resolve_model(Path(path))
    target = kw.pop("target", None) or resolve_target()
    return LocalPipeline(
        [open_stage(src, StageSpec(i, stages), target=target, cache_dir=cache_dir, kv=kv, **kw) for i in range(stages)]
    )
