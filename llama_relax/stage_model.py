"""One pipeline stage of the Llama model: a contiguous range of decoder layers, compiled as a library of its own.

Stage 0 also embeds, unless the embedding is tied to the LM head: then the last stage, which holds the table for
the LM head, embeds too (the driver asks it for stage 0's input), so the table is in memory once. The last stage
also holds the final norm and the LM head. Layers are split by `LlamaConfig.layer_ranges` (balanced with the
table's weight).
What moves between stages is the hidden states `[tokens, hidden]`; every stage runs the same `begin_forward` on
its own paged KV cache, which holds only its layers. Parameters are named locally (`model.layers.{j}` for the
stage's j-th layer); `StageSpec.global_name` maps them to the checkpoint's names.

Shapes: `s` = tokens in a forward, `b` = batch size, `h` = hidden, `V` = vocab.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from llama_relax.config import LlamaConfig
from llama_relax.model import LlamaForCausalLM, kv_cache_spec
from llama_relax.quantization import NO_QUANTIZATION, QuantPlan

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class StageSpec:
    """Stage `index` of `count` contiguous stages."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"stage index {self.index} is not in [0, {self.count})")

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1

    def layers(self, config: LlamaConfig) -> range:
        return config.layer_ranges(self.count)[self.index]

    def embeds(self, config: LlamaConfig) -> bool:
        """Whether this stage looks token ids up (`LlamaConfig.embedding_stage`: the first, or the last when the
        table is tied; then the driver asks it for the first stage's input)."""
        return self.index == config.embedding_stage(self.count)

    def holds_table(self, config: LlamaConfig) -> bool:
        """Whether this stage holds the embedding table (to embed, or as the tied LM head)."""
        return self.embeds(config) or (self.last and config.tie_word_embeddings)

    def key(self) -> list[int]:
        return [self.index, self.count]

    def cache_key(self, config: LlamaConfig) -> list[int]:
        """What a stage library depends on: its place and its layers (the split is the config's policy)."""
        layers = self.layers(config)
        return [self.index, self.count, layers.start, len(layers), int(self.embeds(config))]

    def global_name(self, config: LlamaConfig, local: str) -> str:
        """The checkpoint name of a stage parameter (`model.layers.{j}.` -> `model.layers.{first layer + j}.`)."""
        m = _LAYER.match(local)
        if m is None:
            return local
        return f"model.layers.{self.layers(config)[int(m.group(1))]}." + local[m.end() :]

    def local_plan(self, config: LlamaConfig, plan: QuantPlan) -> QuantPlan:
        """`plan` with the stage's layers under their local names (what the stage's modules look up)."""
        first = self.layers(config)[0]
        formats = []
        for name, fmt in plan.formats:
            m = _LAYER.match(name)
            if m is None:
                formats.append((name, fmt))
            elif int(m.group(1)) in self.layers(config):
                formats.append((f"model.layers.{int(m.group(1)) - first}." + name[m.end() :], fmt))
        return dataclasses.replace(plan, formats=tuple(formats))


class LlamaStage(nn.Module):
    """The layers of one stage plus, on the first, the embedding and, on the last, the final norm and LM head.

    Methods (exported by `get_default_spec`): `embed` (the embedding stage), `prefill_forward` ([1, s, h] -> [1, s, h]),
    `decode_forward` ([b, 1, h] -> [b, 1, h]), `get_logits` and `batch_select_last_hidden_states` (last stage),
    `create_paged_kv_cache` (this stage's layers only). The last stage's forwards return final-normed states."""

    def __init__(
        self,
        config: LlamaConfig,
        stage: StageSpec,
        dtype: str = "float32",
        plan: QuantPlan = NO_QUANTIZATION,
        kv_dtype: str | None = None,
    ) -> None:
        local = config.replace(num_hidden_layers=len(stage.layers(config)))
        plan = stage.local_plan(config, plan)
        full = LlamaForCausalLM(local, dtype, plan, kv_dtype)  # its parts with local names; only those below are kept
        self.config, self.stage, self.dtype, self.kv_dtype = config, stage, dtype, full.kv_dtype
        self._kv = _KVCacheOwner(local, full.kv_dtype)
        self.model = _StageBody(full, stage, config)
        if stage.last and not config.tie_word_embeddings:
            self.lm_head = full.lm_head

    def embed(self, input_ids: Tensor) -> Tensor:  # [s] int32 -> [s, h]
        return self.model.embed_tokens.lookup(input_ids)

    def get_logits(self, hidden_states: Tensor) -> Tensor:  # [n, h] -> float32 [n, V]
        table = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return table.project(hidden_states)

    def batch_select_last_hidden_states(self, hidden_states: Tensor, logit_positions: Tensor) -> Tensor:
        return op.take(hidden_states, logit_positions, axis=0)  # [s, h], [b] -> [b, h]

    def prefill_forward(self, hidden_states: Tensor, paged_kv_cache: PagedKVCache):
        return self.model(hidden_states, paged_kv_cache), paged_kv_cache  # [1, s, h]

    def decode_forward(self, hidden_states: Tensor, paged_kv_cache: PagedKVCache):
        return self.model(hidden_states, paged_kv_cache), paged_kv_cache  # [b, 1, h]

    def create_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        return LlamaForCausalLM.create_paged_kv_cache(
            self._kv, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window
        )  # type: ignore[arg-type]

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        h, dt = self.config.hidden_size, self.dtype
        kv = nn.spec.Object(object_type=PagedKVCache)
        effect: dict[str, Any] = {"param_mode": "packed", "effect_mode": "none"}
        spec: dict[str, Any] = {
            "prefill_forward": {
                "hidden_states": nn.spec.Tensor([1, "seq_len", h], dt),
                "paged_kv_cache": kv,
                "$": effect,
            },
            "decode_forward": {
                "hidden_states": nn.spec.Tensor(["batch_size", 1, h], dt),
                "paged_kv_cache": kv,
                "$": effect,
            },
            "create_paged_kv_cache": kv_cache_spec(),
        }
        if self.stage.embeds(self.config):
            spec["embed"] = {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": effect}
        if self.stage.last:
            spec["get_logits"] = {"hidden_states": nn.spec.Tensor(["seq_len", h], dt), "$": effect}
            spec["batch_select_last_hidden_states"] = {
                "hidden_states": nn.spec.Tensor(["seq_len", h], dt),
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                "$": {"param_mode": "none", "effect_mode": "none"},
            }
        return nn.spec.ModuleSpec.from_raw(spec, self)


@dataclass(frozen=True)
class _KVCacheOwner:
    """What `LlamaForCausalLM.create_paged_kv_cache` reads (a plain object: not a module, so nothing is exported)."""

    config: LlamaConfig
    kv_dtype: str


class _StageBody(nn.Module):
    """`model.*` of a stage: its layers (local names), the embedding where needed, the final norm on the last."""

    def __init__(self, full: LlamaForCausalLM, stage: StageSpec, config: LlamaConfig) -> None:
        self.layers = full.model.layers
        self.last = stage.last
        if stage.holds_table(config):
            self.embed_tokens = full.model.embed_tokens
        if stage.last:
            self.norm = full.model.norm

    def forward(self, hidden_states: Tensor, paged_kv_cache: PagedKVCache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, paged_kv_cache, layer_id)
        return self.norm(hidden_states) if self.last else hidden_states
