"""Writing model files for tests: a Hugging Face directory from params in the project's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def write_hf_dir(path: Path, config, params: dict[str, np.ndarray]) -> Path:
    """Inverse of the loader: split fused weights and store HF `[out, in]` tensors."""
    c = config
    hq, hkv, d, inter = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.head_dim,
        c.intermediate_size,
    )
    del d
    out = {
        "model.embed_tokens.weight": params["model.embed_tokens.weight"],
        "model.norm.weight": params["model.norm.weight"],
    }
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = params["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}."
        qkv = params[pre + "self_attn.qkv_proj.weight"].T
        out[pre + "self_attn.q_proj.weight"] = qkv[:hq]
        out[pre + "self_attn.k_proj.weight"] = qkv[hq : hq + hkv]
        out[pre + "self_attn.v_proj.weight"] = qkv[hq + hkv :]
        out[pre + "self_attn.o_proj.weight"] = params[pre + "self_attn.o_proj.weight"].T
        gu = params[pre + "mlp.gate_up_proj.weight"].T
        out[pre + "mlp.gate_proj.weight"] = gu[:inter]
        out[pre + "mlp.up_proj.weight"] = gu[inter:]
        out[pre + "mlp.down_proj.weight"] = params[pre + "mlp.down_proj.weight"].T
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[pre + n] = params[pre + n]
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, str(path / "model.safetensors"))
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": c.hidden_size,
        "intermediate_size": inter,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "rms_norm_eps": c.rms_norm_eps,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.context_window_size,
        "prefill_chunk_size": c.prefill_chunk_size,
        "rope_theta": c.position_embedding_base,
        "tie_word_embeddings": c.tie_word_embeddings,
        "rope_scaling": c.rope_scaling.to_tvm_dict() or None,
    }
    (path / "config.json").write_text(json.dumps(hf))
    return path
