"""Hugging Face checkpoints: `config.json` plus one or more `.safetensors` files (bf16/f16/f32)."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from llama_relax.config import LlamaConfig
from llama_relax.loader.mapping import TensorSource, iter_params
from llama_relax.quantization import NO_QUANTIZATION, QuantPlan

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    """The parsed `config.json` of an HF model directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_hf_config(model_dir: Path, **overrides: Any) -> LlamaConfig:
    """`LlamaConfig` from an HF directory's `config.json`."""
    return LlamaConfig.from_hf_dict(read_hf_config(model_dir), **overrides)


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files: those the index names, else `model.safetensors`, else every `*.safetensors`."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        with index.open(encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: missing or empty 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{model_dir}: no .safetensors weights (expected {SINGLE_FILE} or {INDEX_FILE}; "
            "PyTorch .bin checkpoints are not supported)"
        )
    return files


class SafetensorsSource(TensorSource):
    """Tensors of an HF directory, read lazily from its safetensors shards."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self.description = str(self.model_dir)
        self._where: dict[str, Path] = {}
        for path in safetensors_files(self.model_dir):
            with safe_open(str(path), framework="numpy") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    self._where.setdefault(key, path)

    def get(self, name: str) -> np.ndarray | None:
        """The tensor, read from its shard opened for this read only: the file's mapped pages are released as
        soon as it is read, so loading holds no more of the file than one tensor."""
        path = self._where.get(name)
        if path is None:
            return None
        with safe_open(str(path), framework="numpy") as handle:
            return handle.get_tensor(name)

    def rows(self, name: str) -> tuple[tuple[int, ...], Callable[[int, int], np.ndarray]] | None:
        """Row ranges of a 2-D tensor, each read from its shard opened for that read (quantizing a big embedding
        then holds one chunk of it, not the whole float tensor)."""
        path = self._where.get(name)
        if path is None:
            return None
        with safe_open(str(path), framework="numpy") as handle:
            shape = tuple(int(d) for d in handle.get_slice(name).get_shape())
        if len(shape) != 2:
            return None

        def read(i: int, j: int) -> np.ndarray:
            with safe_open(str(path), framework="numpy") as h:
                return h.get_slice(name)[i:j]

        return shape, read


def load_hf_params(
    model_dir: Path,
    config: LlamaConfig,
    dtype: str = "float32",
    progress: bool = False,
    plan: QuantPlan = NO_QUANTIZATION,
    only: Collection[str] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Every model parameter from an HF directory, one at a time (see `iter_params`)."""
    return iter_params(SafetensorsSource(model_dir), config, dtype, progress, plan, only)
