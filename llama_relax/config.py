"""`LlamaConfig`: the Llama architecture's hyper-parameters, validated once at construction.

Built from a Hugging Face `config.json` (`LlamaConfig.from_hf_dict`) or from GGUF metadata
(`LlamaConfig.from_gguf_metadata`). Derived defaults follow MLC-LLM: `head_dim = hidden / heads`,
`num_key_value_heads = heads`, `context_window_size` from `max_position_embeddings`, `prefill_chunk_size`
from the context window. Invalid values raise `ValueError` naming the field.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROPE_TYPES = ("default", "llama3")
MAX_PREFILL_CHUNK = 8192


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `rope_type="default"` is plain RoPE; "llama3" rescales low frequencies."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type: unknown rope type {self.rope_type!r} (known: {', '.join(ROPE_TYPES)})"
            )
        if self.rope_type == "llama3":
            if not self.factor > 0:
                raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ValueError(
                    "rope_scaling: need high_freq_factor > low_freq_factor > 0, got "
                    f"{self.high_freq_factor} and {self.low_freq_factor}"
                )
            if self.original_max_position_embeddings <= 0:
                raise ValueError("rope_scaling.original_max_position_embeddings must be > 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RopeScaling:
        """Accept HF's `rope_scaling` / `rope_parameters` dicts (`type` or `rope_type`)."""
        if not d:
            return cls()
        rope_type = d.get("rope_type", d.get("type", "default")) or "default"
        if rope_type == "default":
            return cls()
        kwargs: dict[str, Any] = {"rope_type": rope_type}
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            if name in d:
                kwargs[name] = float(d[name])
        if "original_max_position_embeddings" in d:
            kwargs["original_max_position_embeddings"] = int(d["original_max_position_embeddings"])
        return cls(**kwargs)

    def to_tvm_dict(self) -> dict[str, Any]:
        """The dict TVM's KV cache and RoPE kernels expect (`{}` means plain RoPE)."""
        if self.rope_type == "default":
            return {}
        return {
            "rope_type": self.rope_type,
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }

    def inv_freq(self, head_dim: int, theta: float) -> list[float]:
        """Per-pair inverse frequencies (length head_dim // 2), scaling applied. Reference math."""
        base = [1.0 / theta ** (2 * i / head_dim) for i in range(head_dim // 2)]
        if self.rope_type == "default":
            return base
        old = self.original_max_position_embeddings
        low_wavelen = old / self.low_freq_factor
        high_wavelen = old / self.high_freq_factor
        out = []
        for f in base:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / self.factor)
            else:
                smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
                out.append((1 - smooth) * f / self.factor + smooth * f)
        return out


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family model (the MLC-LLM field set). Zero means "derive"."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    rms_norm_eps: float
    vocab_size: int
    tie_word_embeddings: bool = False
    position_embedding_base: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    context_window_size: int = 0
    prefill_chunk_size: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    tensor_parallel_shards: int = 1
    pipeline_parallel_stages: int = 1
    disaggregation: bool = False
    max_batch_size: int = 64

    def __post_init__(self) -> None:
        positive = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.position_embedding_base > 0:
            raise ValueError(f"position_embedding_base (rope_theta) must be > 0, got {self.position_embedding_base!r}")
        if isinstance(self.rope_scaling, Mapping) or self.rope_scaling is None:
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even integer, got {self.head_dim}")
        if self.num_key_value_heads == 0:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.num_key_value_heads < 0 or self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.context_window_size <= 0:
            raise ValueError(
                "context_window_size must be > 0 (set it, or max_position_embeddings in config.json), "
                f"got {self.context_window_size}"
            )
        if self.prefill_chunk_size == 0:
            object.__setattr__(self, "prefill_chunk_size", min(self.context_window_size, MAX_PREFILL_CHUNK))
        elif self.prefill_chunk_size < 0:
            raise ValueError(f"prefill_chunk_size must be >= 0, got {self.prefill_chunk_size}")
        else:
            object.__setattr__(self, "prefill_chunk_size", min(self.prefill_chunk_size, self.context_window_size))
        if self.tensor_parallel_shards != 1:
            raise ValueError(f"tensor_parallel_shards: only 1 is supported, got {self.tensor_parallel_shards}")
        stages = self.pipeline_parallel_stages
        if not 1 <= stages <= self.num_hidden_layers:
            raise ValueError(
                f"pipeline_parallel_stages must be in [1, num_hidden_layers={self.num_hidden_layers}], got {stages}"
            )
        if self.max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be > 0, got {self.max_batch_size}")

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def layer_partition(self) -> list[int]:
        """Stage boundaries as an indptr: stage s holds layers [p[s], p[s+1]) (`layer_ranges`)."""
        ranges = self.stage_layer_ranges()
        return [0, *(r.stop for r in ranges)]

    def stage_layer_ranges(self) -> list[range]:
        return self.layer_ranges(self.pipeline_parallel_stages)

    def embedding_stage(self, stages: int) -> int:
        """The stage that looks token ids up: the first, or, when the table is tied to the LM head and there are
        several stages, the last (which holds the table anyway), so the table is in memory once."""
        return stages - 1 if self.tie_word_embeddings and stages > 1 else 0

    def table_layers(self) -> float:
        """A vocabulary table's parameters in units of one decoder layer's."""
        h, i = self.hidden_size, self.intermediate_size
        layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i
        return self.vocab_size * h / layer

    def layer_ranges(self, stages: int) -> list[range]:
        """The layers of each of `stages` contiguous pipeline stages, balanced by parameters: every layer weighs
        the same, and a stage holding a vocabulary table (the embedding on the first unless it is tied, the LM
        head or tied table on the last) carries the table's weight too, so it gets fewer layers. The split
        minimizes the heaviest stage (memory, and compute per token, both scale with it); of equally heavy
        splits, the earlier stages take the extra layers."""
        n = self.num_hidden_layers
        if not 1 <= stages <= n:
            raise ValueError(f"stages must be in [1, num_hidden_layers={n}], got {stages}")
        if stages == 1:
            return [range(n)]
        table = self.table_layers()
        extra = [0.0] * stages
        extra[-1] += table
        if not self.tie_word_embeddings:
            extra[0] += table
        caps = sorted({m + t for m in range(1, n + 1) for t in {0.0, extra[0], extra[-1], extra[0] + extra[-1]}})
        for cap in caps:
            sizes = _pack(n, extra, cap)
            if sizes is not None:
                bounds = [0, *itertools.accumulate(sizes)]
                return [range(bounds[k], bounds[k + 1]) for k in range(stages)]
        raise AssertionError("unreachable: the last cap holds every layer")  # pragma: no cover

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (also the compile-cache key material)."""
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Inverse of `to_dict`."""
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling") or {})
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    # ---- constructors -------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
        """From a Hugging Face `config.json` dict. Extra keys are ignored."""
        required = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
        for name in required:
            if name not in hf:
                raise ValueError(f"config.json: missing field {name!r}")
        rope_params = hf.get("rope_scaling") or hf.get("rope_parameters")
        theta = hf.get("rope_theta")
        if theta is None and isinstance(hf.get("rope_parameters"), Mapping):
            theta = hf["rope_parameters"].get("rope_theta")
        context = hf.get("context_window_size") or hf.get("max_position_embeddings") or 0
        kwargs: dict[str, Any] = {
            "hidden_size": hf["hidden_size"],
            "intermediate_size": hf["intermediate_size"],
            "num_attention_heads": hf["num_attention_heads"],
            "num_hidden_layers": hf["num_hidden_layers"],
            "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "vocab_size": hf["vocab_size"],
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "position_embedding_base": float(
                theta if theta is not None else hf.get("position_embedding_base", 10000.0)
            ),
            "rope_scaling": RopeScaling.from_dict(rope_params),
            "context_window_size": int(context),
            "prefill_chunk_size": int(hf.get("prefill_chunk_size", 0)),
            "num_key_value_heads": int(hf.get("num_key_value_heads") or 0),
            "head_dim": int(hf.get("head_dim") or 0),
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
        """From GGUF key/values (`llama.*`, plain Python values). `has_output_tensor` decides tying."""
        arch = meta.get("general.architecture", "llama")
        if arch != "llama":
            raise ValueError(f"general.architecture: only 'llama' is supported, got {arch!r}")

        def get(key: str, default: Any = None) -> Any:
            full = f"llama.{key}"
            if full not in meta and default is None:
                raise ValueError(f"GGUF metadata: missing {full!r}")
            return meta.get(full, default)

        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        vocab = meta.get("llama.vocab_size")
        if vocab is None:
            vocab = meta.get("tokenizer.ggml.tokens.count")
        if vocab is None:
            raise ValueError("GGUF metadata: missing 'llama.vocab_size'")
        scaling = None
        if meta.get("llama.rope.scaling.type") == "llama3" or "llama.rope.scaling.low_freq_factor" in meta:
            scaling = {
                "rope_type": "llama3",
                "factor": meta.get("llama.rope.scaling.factor", 8.0),
                "low_freq_factor": meta.get("llama.rope.scaling.low_freq_factor", 1.0),
                "high_freq_factor": meta.get("llama.rope.scaling.high_freq_factor", 4.0),
                "original_max_position_embeddings": meta.get("llama.rope.scaling.original_context_length", 8192),
            }
        kwargs: dict[str, Any] = {
            "hidden_size": hidden,
            "intermediate_size": int(get("feed_forward_length")),
            "num_attention_heads": heads,
            "num_hidden_layers": int(get("block_count")),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            "vocab_size": int(vocab),
            "tie_word_embeddings": not bool(meta.get("has_output_tensor", False)),
            "position_embedding_base": float(get("rope.freq_base", 10000.0)),
            "rope_scaling": RopeScaling.from_dict(scaling),
            "context_window_size": int(get("context_length")),
            "num_key_value_heads": int(get("attention.head_count_kv", heads)),
            "head_dim": int(meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count") or 0),
        }
        kwargs.update(overrides)
        return cls(**kwargs)


def _pack(n: int, extra: list[float], cap: float) -> list[int] | None:
    """Layers per stage, front-loaded: each stage takes as many as keep it within `cap` (and leave one for each
    later stage); None if the last stage would exceed `cap`."""
    sizes, left = [], n
    for k, e in enumerate(extra[:-1]):
        take = min(int(cap - e + 1e-9), left - (len(extra) - 1 - k))
        if take < 1:
            return None
        sizes.append(take)
        left -= take
    if left + extra[-1] > cap + 1e-9:
        return None
    return [*sizes, left]
