"""llama_relax: the Llama architecture in Apache TVM Relax, its weight loaders, compiler cache and runtime."""

from llama_relax.config import LlamaConfig, RopeScaling

__all__ = ["LlamaConfig", "RopeScaling"]
