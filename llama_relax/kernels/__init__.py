"""Hand-written TIR kernels that replace slow stock TVM kernels in the compiled module."""

from llama_relax.kernels.attention_cpu import cpu_attention_kernels
from llama_relax.kernels.replace import cpu_attention_pass

__all__ = ["cpu_attention_kernels", "cpu_attention_pass"]
