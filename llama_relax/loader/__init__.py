"""Weight loaders: Hugging Face safetensors directories and GGUF files -> the model's fused `[in, out]` params."""

from llama_relax.loader.gguf_file import gguf_metadata
from llama_relax.loader.mapping import expected_param_shapes
from llama_relax.loader.source import ModelSource, load_config, load_params, quant_plan, resolve_model, stream_params

__all__ = [
    "ModelSource",
    "expected_param_shapes",
    "gguf_metadata",
    "load_config",
    "load_params",
    "quant_plan",
    "resolve_model",
    "stream_params",
]
