"""An independent NumPy float64 implementation of the Llama forward pass (the model tests' oracle).

Written from the published architecture (Hugging Face's Llama: RMSNorm, rotate-half RoPE with optional llama3
frequency scaling, GQA causal attention, SiLU-gated MLP), not from `llama_relax.model`. Weights use the
project's layout (`[in, out]` linears, fused qkv / gate_up), as produced by `llama_relax.loader`.
"""

from __future__ import annotations

import numpy as np

from llama_relax.config import LlamaConfig


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """x: [n, heads, d]; rotate-half convention (pairs (i, i + d/2))."""
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [n, d/2]
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def q8_round(x: np.ndarray) -> np.ndarray:
    """Rows [..., d] through llama.cpp's q8_0 and back: blocks of 32, scale amax / 127 stored as float16."""
    b = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    q = np.round(np.where(amax > 0, b * 127 / np.where(amax > 0, amax, 1), 0))
    return (q * (amax / 127).astype(np.float16).astype(np.float64)).reshape(x.shape)


class NumpyLlama:
    """Keeps per-sequence K/V history so that it can follow prefill/decode calls token by token.

    `kv_dtype` rounds what the model hands its KV cache as that cache does: "float16": q, k, v as projected, q and
    k again after RoPE, and the attention output; "q8_0": q, k (after RoPE), v and the attention output quantized
    to q8_0 blocks and back. The rest stays float64."""

    def __init__(self, config: LlamaConfig, params: dict[str, np.ndarray], kv_dtype: str | None = None) -> None:
        self.c = config

        def same(a: np.ndarray) -> np.ndarray:
            return a

        if kv_dtype == "q8_0":
            self.round_pre, self.round_v, self.round = same, q8_round, q8_round
        elif kv_dtype:
            self.round_pre = self.round = lambda a: a.astype(kv_dtype).astype(np.float64)
            self.round_v = same  # v was rounded with the projection
        else:
            self.round_pre = self.round = self.round_v = same
        self.p = {k: v.astype(np.float64) for k, v in params.items()}
        self.inv_freq = np.array(config.rope_scaling.inv_freq(config.head_dim, config.position_embedding_base))
        self.kv: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

    def hidden(self, seq_id: int, tokens: list[int]) -> np.ndarray:
        """Append tokens to the sequence; final-normed hidden states [n, h] of the appended tokens."""
        c, p = self.c, self.p
        hist = self.kv.setdefault(
            seq_id, [(np.zeros((0, c.num_key_value_heads, c.head_dim)),) * 2] * c.num_hidden_layers
        )
        start = hist[0][0].shape[0]
        n = len(tokens)
        pos = np.arange(start, start + n)
        x = p["model.embed_tokens.weight"][np.asarray(tokens)]
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        group = hq // hkv
        new_hist = []
        for i in range(c.num_hidden_layers):
            pre = f"model.layers.{i}."
            h = rms_norm(x, p[pre + "input_layernorm.weight"], c.rms_norm_eps)
            qkv = self.round_pre(h @ p[pre + "self_attn.qkv_proj.weight"])
            q = qkv[:, : hq * d].reshape(n, hq, d)
            k = qkv[:, hq * d : (hq + hkv) * d].reshape(n, hkv, d)
            v = self.round_v(qkv[:, (hq + hkv) * d :].reshape(n, hkv, d))
            q, k = self.round(rope(q, pos, self.inv_freq)), self.round(rope(k, pos, self.inv_freq))
            k_all = np.concatenate([hist[i][0], k])
            v_all = np.concatenate([hist[i][1], v])
            new_hist.append((k_all, v_all))
            total = k_all.shape[0]
            out = np.empty((n, hq, d))
            mask = np.arange(total)[None, :] <= pos[:, None]  # causal: key position <= query position
            for head in range(hq):
                kh, vh = k_all[:, head // group], v_all[:, head // group]
                scores = (q[:, head] @ kh.T) / np.sqrt(d)
                scores = np.where(mask, scores, -np.inf)
                scores -= scores.max(axis=-1, keepdims=True)
                w = np.exp(scores)
                w /= w.sum(axis=-1, keepdims=True)
                out[:, head] = w @ vh
            x = x + self.round(out).reshape(n, hq * d) @ p[pre + "self_attn.o_proj.weight"]
            h = rms_norm(x, p[pre + "post_attention_layernorm.weight"], c.rms_norm_eps)
            gu = h @ p[pre + "mlp.gate_up_proj.weight"]
            gate, up = gu[:, : c.intermediate_size], gu[:, c.intermediate_size :]
            x = x + (gate / (1 + np.exp(-gate)) * up) @ p[pre + "mlp.down_proj.weight"]
        self.kv[seq_id] = new_hist
        return rms_norm(x, p["model.norm.weight"], c.rms_norm_eps)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        head = self.p["model.embed_tokens.weight"] if self.c.tie_word_embeddings else self.p["lm_head.weight"]
        return hidden @ head.T

    def forward(self, seq_id: int, tokens: list[int]) -> np.ndarray:
        """Logits [n, V] of every appended token."""
        return self.logits(self.hidden(seq_id, tokens))


def random_params(config: LlamaConfig, seed: int = 0, scale: float = 0.5) -> dict[str, np.ndarray]:
    """Random float32 weights in the project's layout (shapes from the loader's table)."""
    from llama_relax.loader import expected_param_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_param_shapes(config).items():
        if name.endswith("norm.weight"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = shape[0] if "layers" in name else shape[-1]
            out[name] = (rng.standard_normal(shape) * scale / np.sqrt(fan_in)).astype(np.float32)
    return out


def quantized_params(params: dict[str, np.ndarray], plan) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(runtime params, reference params) of `plan`: each quantized weight's arrays (k-major, as the model stores
    them), and the float32 values the kernels see (dequantized, in the project's layout) for the NumPy reference."""
    from llama_relax.loader.quantize import dequantize, quantize
    from llama_relax.quantization import WeightFormat, quantized_array_names

    runtime, reference = dict(params), dict(params)
    for name, fmt in plan.formats:
        if fmt is WeightFormat.F:
            continue
        table = "embed_tokens" in name or "lm_head" in name  # [V, H]; linear weights are stored [in, out]
        w = params[name] if table else params[name].T  # [out, in]
        arrays = quantize(fmt, w, plan.scale_dtype)
        del runtime[name]
        names = quantized_array_names(fmt)
        runtime.update({f"{name}.{s}": np.ascontiguousarray(a.T) for s, a in zip(names, arrays, strict=True)})
        back = dequantize(fmt, arrays)
        reference[name] = back if table else np.ascontiguousarray(back.T)
    return runtime, reference
