"""What a model path is (`resolve_model`), and format-dispatching `load_config` / `load_params`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llama_relax.config import LlamaConfig
from llama_relax.loader.gguf_file import is_gguf_file, load_gguf_config, load_gguf_params
from llama_relax.loader.hf import load_hf_config, load_hf_params

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
    src: ModelSource, config: LlamaConfig, dtype: str = "float32", progress: bool = False
) -> dict[str, np.ndarray]:
    """Every model parameter (names/shapes of `expected_param_shapes`) as a C-contiguous `dtype` array."""
    if src.kind == "hf":
        return load_hf_params(src.path, config, dtype, progress)
    return load_gguf_params(src.path, config, dtype, progress)
