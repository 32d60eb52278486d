"""What a model path is (`resolve_model`), and format-dispatching `load_config` / `load_params`."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llama_relax.config import LlamaConfig
from llama_relax.loader.gguf_file import gguf_plan, is_gguf_file, load_gguf_config, load_gguf_params
from llama_relax.loader.hf import load_hf_config, load_hf_params
from llama_relax.quantization import NO_QUANTIZATION, Quantization, QuantPlan, uniform_plan

SourceKind = Literal["hf", "gguf"]


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: an HF directory (`kind="hf"`) or a single `.gguf` file (`kind="gguf"`)."""

    path: Path
    kind: SourceKind

    def __post_init__(self) -> None:
        if self.kind not in ("hf", "gguf"):
            raise ValueError(f"ModelSource.kind must be 'hf' or 'gguf', got {self.kind!r}")
        object.__setattr__(self, "path", Path(self.path))


def resolve_model(path: str | os.PathLike[str]) -> ModelSource:
    """Directory with `config.json` -> hf; `.gguf` file (or directory holding exactly one) -> gguf."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path does not exist: {p}")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(
                f"model path {p} is a file but not a .gguf file (for Hugging Face models pass the directory)"
            )
        if not is_gguf_file(p):
            raise ValueError(f"{p}: not a GGUF file (bad magic)")
        return ModelSource(p, "gguf")
    if (p / "config.json").is_file():
        return ModelSource(p, "hf")
    ggufs = sorted(q for q in p.glob("*.gguf") if q.is_file())
    if len(ggufs) == 1:
        return resolve_model(ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(q.name for q in ggufs)
        raise ValueError(f"{p} holds several .gguf files ({names}); pass the path of the one to load")
    raise FileNotFoundError(
        f"{p}: neither a Hugging Face model directory (no config.json) nor one holding a .gguf file"
    )


def load_config(src: ModelSource, **overrides: Any) -> LlamaConfig:
    """The model's `LlamaConfig`; `overrides` replace fields (e.g. `context_window_size=2048`)."""
    if src.kind == "hf":
        return load_hf_config(src.path, **overrides)
    return load_gguf_config(src.path, **overrides)


def load_params(
    src: ModelSource,
    config: LlamaConfig,
    dtype: str = "float32",
    progress: bool = False,
    plan: QuantPlan = NO_QUANTIZATION,
) -> dict[str, np.ndarray]:
    """Every model parameter at once (tests and tools); serving streams `stream_params` into the runtime."""
    return dict(stream_params(src, config, dtype, progress, plan))


def stream_params(
    src: ModelSource,
    config: LlamaConfig,
    dtype: str = "float32",
    progress: bool = False,
    plan: QuantPlan = NO_QUANTIZATION,
    only: Collection[str] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Every model parameter (see `iter_params`; `only`: just these), one at a time, as C-contiguous arrays."""
    if src.kind == "hf":
        return load_hf_params(src.path, config, dtype, progress, plan, only)
    return load_gguf_params(src.path, config, dtype, progress, plan, only)


def quant_plan(src: ModelSource, config: LlamaConfig, quantization: str | Quantization, target_kind: str) -> QuantPlan:
    """The plan for `--quantization` (`auto`: `gguf` for a .gguf file, `none` for an HF directory)."""
    if quantization == "auto":
        quantization = Quantization.GGUF if src.kind == "gguf" else Quantization.NONE
    try:
        q = Quantization(quantization)
    except ValueError:
        names = ", ".join(["auto", *(m.value for m in Quantization)])
        raise ValueError(f"--quantization: unknown scheme {quantization!r} (one of {names})") from None
    if q is Quantization.GGUF:
        if src.kind != "gguf":
            raise ValueError("--quantization gguf needs a .gguf model; for an HF directory use q4f32_1 or q8_0")
        return gguf_plan(src.path, config)
    return uniform_plan(q, config, target_kind)
