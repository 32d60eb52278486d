"""The Llama architecture as a declarative `tvm.relax.frontend.nn` module, plus its export spec.

Only the model lives here: weight-name mapping is in `llama_relax.loader`, compilation in `llama_relax.compile`,
execution in `llama_relax.runtime`, quantized parameters in `llama_relax.quantization`. Unquantized linear weights
are stored `[in, out]` (the loader transposes Hugging Face's `[out, in]`) so CPU matmul schedules can vectorize
along the contiguous output columns, and so are quantized ones (in groups along the input); a float LM head (or
tied embedding table) is `[vocab, hidden]`, a quantized one `[hidden, vocab]`.

Shapes in comments: `s` = tokens in a (batched) prefill, `b` = batch size, `h` = hidden, `d` = head_dim,
`Hq`/`Hkv` = query/key-value heads, `V` = vocab.
"""

from __future__ import annotations

from typing import Any

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from llama_relax.config import LlamaConfig
from llama_relax.kernels.attention_q8 import dequantize_q8, rope_quantize_q8, row_width
from llama_relax.kv_dtype import kv_storage
from llama_relax.quantization import NO_QUANTIZATION, QuantizedWeight, QuantPlan, WeightFormat


class Linear(nn.Module):
    """`y = x @ W` without bias. Unquantized: `weight: [in, out]`; quantized: `weight` is a `QuantizedWeight`
    (k-major too) dequantized inside the matmul kernel."""

    def __init__(self, in_features: int, out_features: int, dtype: str, plan: QuantPlan, name: str) -> None:
        self.in_features = in_features
        self.out_features = out_features
        fmt = plan.format(name)
        if fmt is WeightFormat.F:
            self.weight = nn.Parameter((in_features, out_features), dtype)
        else:
            self.weight = QuantizedWeight(out_features, in_features, fmt, dtype, plan.scale_dtype)

    def forward(self, x: Tensor) -> Tensor:  # x: [..., in] -> [..., out]
        if isinstance(self.weight, QuantizedWeight):
            return self.weight.matmul(x)
        return op.matmul(x, self.weight)


class TableWeight(nn.Module):
    """A `[vocab, hidden]` table (the embedding, or the untied LM head), plain or quantized."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: str, plan: QuantPlan, name: str) -> None:
        fmt = plan.format(name)
        if fmt is WeightFormat.F:
            self.weight = nn.Parameter((vocab_size, hidden_size), dtype)
        else:
            self.weight = QuantizedWeight(vocab_size, hidden_size, fmt, dtype, plan.scale_dtype)

    def lookup(self, input_ids: Tensor) -> Tensor:  # [s] int32 -> [s, h]
        if isinstance(self.weight, QuantizedWeight):
            return self.weight.take(input_ids)
        return op.take(self.weight, input_ids, axis=0)

    def project(self, hidden_states: Tensor) -> Tensor:  # [.., h] -> float32 [.., V], reading the table in place
        if isinstance(self.weight, QuantizedWeight):
            return self.weight.matmul(hidden_states, "float32")
        logits = op.matmul(hidden_states, op.permute_dims(self.weight))
        return logits.astype("float32") if logits.dtype != "float32" else logits


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: str) -> None:
        self.eps = eps
        self.weight = nn.Parameter((hidden_size,), dtype)

    def forward(self, x: Tensor) -> Tensor:
        return op.rms_norm(x, self.weight, axes=[-1], epsilon=self.eps)


class LlamaAttention(nn.Module):
    """Grouped-query attention: fused `qkv_proj`, RoPE and attention inside the paged KV cache, `o_proj`."""

    def __init__(self, config: LlamaConfig, dtype: str, plan: QuantPlan, prefix: str, kv_dtype: str) -> None:
        self.config = config
        self.dtype = dtype
        self.kv_dtype = kv_dtype
        self.head_dim = config.head_dim
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        qkv_out = (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, qkv_out, dtype, plan, prefix + "qkv_proj.weight")
        self.o_proj = Linear(
            self.num_q_heads * self.head_dim, config.hidden_size, dtype, plan, prefix + "o_proj.weight"
        )

    def forward(self, hidden_states: Tensor, paged_kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = hidden_states.shape  # hidden_states: [b, s, h]
        qkv = self.qkv_proj(hidden_states)  # [b, s, (Hq + 2 Hkv) d]
        if self.kv_dtype == "q8_0":
            return self.o_proj(self._attention_q8(qkv, paged_kv_cache, layer_id))
        qkv = op.reshape(qkv, (b, s, self.num_q_heads + 2 * self.num_kv_heads, self.head_dim))
        if self.kv_dtype != self.dtype:  # the cache wants q, k, v and the output in its own dtype
            qkv = qkv.astype(self.kv_dtype)
        out = paged_kv_cache.attention_with_fused_qkv(
            layer_id, qkv, self.num_q_heads, sm_scale=self.head_dim**-0.5
        )  # [b, s, Hq, d], kv dtype
        if self.kv_dtype != self.dtype:
            out = out.astype(self.dtype)
        return self.o_proj(op.reshape(out, (b, s, self.num_q_heads * self.head_dim)))

    def _attention_q8(self, qkv: Tensor, paged_kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        """q8_0 KV: rotate q and k here (the cache's rope mode is `none`), quantize the rows, attend, dequantize.
        qkv: [b, s, (Hq + 2 Hkv) d] float32 -> [b, s, Hq d] float32."""
        b, s, _ = qkv.shape
        heads, d, w = self.num_q_heads + 2 * self.num_kv_heads, self.head_dim, row_width(self.head_dim)
        flat = op.reshape(qkv, (b * s, heads, d))
        positions = paged_kv_cache.get_query_positions(b * s)  # [b s] int32
        c = self.config
        rope_q = rope_quantize_q8(
            self.num_q_heads, self.num_kv_heads, d, c.rope_scaling.to_tvm_dict(), c.position_embedding_base
        )
        rows = op.tensor_ir_op(
            rope_q, "rope_quantize_q8", [flat, positions], Tensor.placeholder([b * s, heads, w], "int8")
        )
        out = paged_kv_cache.attention_with_fused_qkv(
            layer_id, op.reshape(rows, (b, s, heads, w)), self.num_q_heads, sm_scale=d**-0.5
        )  # [b, s, Hq, W] int8
        deq = op.tensor_ir_op(
            dequantize_q8(self.num_q_heads, d),
            "dequantize_q8",
            [op.reshape(out, (b * s, self.num_q_heads, w))],
            Tensor.placeholder([b * s, self.num_q_heads, d], "float32"),
        )
        return op.reshape(deq, (b, s, self.num_q_heads * d))


class LlamaMLP(nn.Module):
    """SiLU-gated MLP with fused `gate_up_proj` (gate columns first, then up)."""

    def __init__(self, config: LlamaConfig, dtype: str, plan: QuantPlan, prefix: str) -> None:
        self.intermediate_size = config.intermediate_size
        h, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = Linear(h, 2 * i, dtype, plan, prefix + "gate_up_proj.weight")
        self.down_proj = Linear(i, h, dtype, plan, prefix + "down_proj.weight")

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up_proj(x)  # [b, s, 2 I]
        gate, up = op.split(gate_up, 2, axis=-1)
        return self.down_proj(op.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, dtype: str, plan: QuantPlan, layer: int, kv_dtype: str) -> None:
        prefix = f"model.layers.{layer}."
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(config, dtype, plan, prefix + "self_attn.", kv_dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(config, dtype, plan, prefix + "mlp.")

    def forward(self, hidden_states: Tensor, paged_kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        attn = self.self_attn(self.input_layernorm(hidden_states), paged_kv_cache, layer_id)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, dtype: str, plan: QuantPlan, kv_dtype: str) -> None:
        self.embed_tokens = TableWeight(config.vocab_size, config.hidden_size, dtype, plan, "model.embed_tokens.weight")
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(config, dtype, plan, i, kv_dtype) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.stage_layer_ranges = config.stage_layer_ranges()

    def forward(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache) -> Tensor:
        hidden_states = input_embeds  # [b, s, h]
        for stage in self.stage_layer_ranges:  # contiguous pipeline stages, in order
            for layer_id in stage:
                hidden_states = self.layers[layer_id](hidden_states, paged_kv_cache, layer_id)
        return self.norm(hidden_states)


class LlamaForCausalLM(nn.Module):
    """Llama causal LM. `dtype` is the activation (and unquantized weight) dtype; logits are always float32.
    `plan` says which weights are stored quantized (`llama_relax.quantization`); the default stores none.
    `kv_dtype` is the paged KV cache's element type (default: `dtype`; see `llama_relax.kv_dtype`)."""

    def __init__(
        self,
        config: LlamaConfig,
        dtype: str = "float32",
        plan: QuantPlan = NO_QUANTIZATION,
        kv_dtype: str | None = None,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        self.model = LlamaModel(config, dtype, plan, self.kv_dtype)
        self.tie_word_embeddings = config.tie_word_embeddings
        if not config.tie_word_embeddings:
            self.lm_head = TableWeight(config.vocab_size, config.hidden_size, dtype, plan, "lm_head.weight")

    # ---- building blocks ----------------------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:  # [s] int32 -> [s, h]
        return self.model.embed_tokens.lookup(input_ids)

    def get_logits(self, hidden_states: Tensor) -> Tensor:  # [n, h] (or [b, n, h]) -> float32 [.., V]
        return (self.model.embed_tokens if self.tie_word_embeddings else self.lm_head).project(hidden_states)

    def batch_select_last_hidden_states(self, hidden_states: Tensor, logit_positions: Tensor) -> Tensor:
        # hidden_states: [1, s, h] (or [s, h]); logit_positions: [b] int32 -> [b, h]
        if hidden_states.ndim == 3:
            hidden_states = op.squeeze(hidden_states, 0)
        return op.take(hidden_states, logit_positions, axis=0)

    # ---- forward entry points (all take embeddings; `embed` turns ids into them) --------------------------
    def prefill_to_last_hidden_states(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        hidden = self.model(input_embed, paged_kv_cache)  # [1, s, h]
        return hidden, paged_kv_cache

    def batch_forward_to_last_hidden_states(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        hidden = self.model(input_embeds, paged_kv_cache)  # [1, s, h] or [b, 1, h]
        return hidden, paged_kv_cache

    def prefill(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        """One sequence: [1, s, h] -> logits of the last token [1, 1, V]."""
        hidden = self.model(input_embed, paged_kv_cache)  # [1, s, h]
        last = op.tensor_expr_op(_last_token_te, "take_last_token", [hidden])  # [1, 1, h]
        return self.get_logits(last), paged_kv_cache  # [1, 1, V]

    def decode(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        """One sequence, one token: [1, 1, h] -> [1, 1, V]."""
        hidden = self.model(input_embed, paged_kv_cache)
        return self.get_logits(hidden), paged_kv_cache

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache):
        """Several sequences concatenated: [1, s, h] + positions [b] -> logits [1, b, V]."""
        hidden = self.model(input_embeds, paged_kv_cache)
        selected = self.batch_select_last_hidden_states(hidden, logit_positions)  # [b, h]
        return op.unsqueeze(self.get_logits(selected), 0), paged_kv_cache

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        """One token per sequence: [b, 1, h] -> [b, 1, V]."""
        hidden = self.model(input_embeds, paged_kv_cache)
        return self.get_logits(hidden), paged_kv_cache

    def batch_verify(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        """Draft tokens of several sequences: [1, s, h] -> logits of every token [1, s, V]."""
        hidden = self.model(input_embeds, paged_kv_cache)
        return self.get_logits(hidden), paged_kv_cache

    # ---- KV cache -----------------------------------------------------------------------------------------
    def create_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        c = self.config
        q8 = self.kv_dtype == "q8_0"
        elem, width = kv_storage(self.kv_dtype, c.head_dim)  # a q8_0 row: int8 quants, then the scales' bytes
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr(kv_layer_partition(c)),
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=width,
            v_head_dim=width,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NONE if q8 else RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=c.position_embedding_base,
            rope_scaling=c.rope_scaling.to_tvm_dict(),
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=width,
            enable_disaggregation=False,
            dtype=elem,
            target=_current_target(),
        )

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        h, dt = self.config.hidden_size, self.dtype
        kv = nn.spec.Object(object_type=PagedKVCache)
        effect: dict[str, Any] = {"param_mode": "packed", "effect_mode": "none"}
        spec: dict[str, Any] = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": effect},
            "get_logits": {"hidden_states": nn.spec.Tensor(["seq_len", h], dt), "$": effect},
            "batch_select_last_hidden_states": {
                "hidden_states": nn.spec.Tensor(["seq_len", h], dt),
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
            "prefill_to_last_hidden_states": {
                "input_embed": nn.spec.Tensor([1, "seq_len", h], dt),
                "paged_kv_cache": kv,
                "$": effect,
            },
            "batch_forward_to_last_hidden_states": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", h], dt),
                "paged_kv_cache": kv,
                "$": effect,
            },
            "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", h], dt), "paged_kv_cache": kv, "$": effect},
            "decode": {"input_embed": nn.spec.Tensor([1, 1, h], dt), "paged_kv_cache": kv, "$": effect},
            "batch_prefill": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", h], dt),
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                "paged_kv_cache": kv,
                "$": effect,
            },
            "batch_decode": {
                "input_embeds": nn.spec.Tensor(["batch_size", 1, h], dt),
                "paged_kv_cache": kv,
                "$": effect,
            },
            "batch_verify": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", h], dt),
                "paged_kv_cache": kv,
                "$": effect,
            },
            "create_paged_kv_cache": kv_cache_spec(),
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)


def kv_cache_spec() -> dict[str, Any]:
    """Export spec of `create_paged_kv_cache` (the whole model's and every stage's); a fresh dict each time:
    `ModuleSpec.from_raw` consumes its "$" entry."""
    return {
        "max_batch_size": int,
        "max_total_seq_len": int,
        "prefill_chunk_size": int,
        "page_size": int,
        "support_sliding_window": int,
        "$": {"param_mode": "none", "effect_mode": "none"},
    }


def kv_layer_partition(config: LlamaConfig) -> list[int]:
    """The KV cache's layer partition. One process runs every stage here, so its cache holds all layers:
    TVM selects the local partition by disco worker id, which is 0 outside a disco session."""
    return [0, config.num_hidden_layers]


def _last_token_te(x: te.Tensor) -> te.Tensor:  # [b, s, h] -> [b, 1, h]
    b, s, h = x.shape
    return te.compute((b, 1, h), lambda i, _, k: x[i, s - 1, k], name="take_last_token")


def _current_target():
    from tvm.target import Target

    target = Target.current(allow_none=True)
    if target is None:
        raise RuntimeError("create_paged_kv_cache must be exported under a `with tvm.target.Target(...)` scope")
    return target
