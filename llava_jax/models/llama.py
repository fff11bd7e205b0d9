"""The LLaMA-family decoder (the `llm/` param subtree): LLaMA / Vicuna / Llama-3, Mistral, Qwen2.

fp32 RMSNorm, rotate-half RoPE (default / linear / llama3), GQA, SwiGLU, optional q/k/v, o and
MLP biases (Qwen2: q/k/v only), tied or untied LM head, optional sliding-window attention
(Mistral). One scanned layer stack for every family: `TextConfig`'s flags choose, never a
second decoder. Inputs carry explicit `positions` (RoPE) and `segment_ids` (attention = causal
AND same segment [AND within the window], 0 = padding), so packed rows and padded batches share
one code path. Decoding uses a preallocated KV cache (`init_cache`) written at `cache["index"]`
(the full length even with a window: the mask, not the buffer, drops keys out of the window).
Optional LoRA adapters on the linear layers live in `layers/lora` (`models/lora.py`); the linear
kernels may be stored int8 / int4 (`base_quant`, `models/quant.py`), dequantized layer by layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llava_jax.config import TextConfig
from llava_jax.models import lora as lora_lib
from llava_jax.models.layers import (
    apply_rope,
    attention_mask,
    dequantize,
    dot_product_attention,
    make_param,
    maybe_remat,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
)


class LlamaDecoder(nnx.Module):
    def __init__(self, cfg: TextConfig, *, param_dtype=jnp.float32, dtype=jnp.float32,
                 remat_policy: str = "none", attention_impl: str = "xla", lora: lora_lib.LoraConfig | None = None,
                 base_quant: str | None = None, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        self.dtype = dtype
        self.remat_policy = remat_policy
        self.attention_impl = attention_impl
        P = lambda shape, axes, init="normal": make_param(rngs, shape, axes, init, param_dtype)  # noqa: E731
        self.embed = P((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        self.layers = LlamaLayers(cfg, P)
        self.final_norm = P((cfg.hidden_size,), ("embed",), "ones")
        if not cfg.tie_word_embeddings:
            self.lm_head = P((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
        if base_quant is not None:  # QLoRA's frozen base: int8 / int4 kernels + scales (models/quant.py)
            from llava_jax.models.quant import quantize_layers

            quantize_layers(self.layers, base_quant)
        if lora is not None:  # drawn last: a seed gives the same base params with or without LoRA
            self.layers.lora = lora_lib.LoraAdapters(cfg, lora, param_dtype, rngs)

    def embed_tokens(self, ids):
        return jnp.take(self.embed.value, ids, axis=0, mode="clip").astype(self.dtype)

    def logits(self, h):
        head = self.embed.value.T if self.cfg.tie_word_embeddings else self.lm_head.value
        return jnp.einsum("bld,dv->blv", h, head.astype(self.dtype))

    def __call__(self, embeds, positions, segment_ids, cache: dict | None = None, return_hidden: bool = False,
                 dropout_rng=None):
        """embeds [B, L, D]; positions, segment_ids [B, L] int; `dropout_rng`: a key for LoRA
        dropout (training; None = no dropout).

        Without a cache, query/key slot i is token i. With a cache, the L new tokens occupy slots
        `cache["index"] + arange(L)`; they attend to earlier valid slots of the cache.
        Returns logits [B, L, V] (or final hidden states) and the updated cache (or None).
        """
        b, l, _ = embeds.shape
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg.head_dim, self.cfg.rope), self.dtype)
        if cache is None:
            slots = jnp.arange(l)
            mask = attention_mask(slots, slots, segment_ids, segment_ids, causal=True, window=self.cfg.sliding_window)
            h, _ = self.layers(embeds.astype(self.dtype), cos, sin, mask, None, None,
                               self.dtype, self.remat_policy, self.attention_impl, segment_ids=segment_ids,
                               dropout_rng=dropout_rng)
            new_cache = None
        else:
            index = cache["index"]
            cache_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, index))
            q_slots = index + jnp.arange(l)
            k_slots = jnp.arange(cache_seg.shape[1])
            mask = attention_mask(q_slots, k_slots, segment_ids, cache_seg, causal=True, window=self.cfg.sliding_window)
            h, (k, v) = self.layers(embeds.astype(self.dtype), cos, sin, mask, (cache["k"], cache["v"]), index,
                                    self.dtype, self.remat_policy, self.attention_impl)
            new_cache = {"k": k, "v": v, "segment_ids": cache_seg, "index": index + l}
        h = rms_norm(h, self.final_norm.value, self.cfg.rms_norm_eps)
        return (h if return_hidden else self.logits(h)), new_cache

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """Preallocated KV cache: k/v [layers, B, max_len, kv_heads, head_dim], slot segment ids
        (0 = empty) and the next write index."""
        cfg = self.cfg
        dtype = dtype or self.dtype
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32),
        }


class LlamaLayers(nnx.Module):
    """All decoder layers, params stacked on a leading `layers` axis (LoRA adapters too)."""

    def __init__(self, cfg: TextConfig, P):
        self.cfg = cfg
        # LlamaDecoder sets the adapters after drawing the base params (data: a sub-module or None)
        self.lora: lora_lib.LoraAdapters | None = nnx.data(None)
        L, d, f, h, kv, hd = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                              cfg.num_kv_heads, cfg.head_dim)
        self.attn_norm = P((L, d), ("layers", "embed"), "ones")
        self.q_kernel = P((L, d, h, hd), ("layers", "embed", "heads", "head_dim"))
        self.k_kernel = P((L, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim"))
        self.v_kernel = P((L, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim"))
        self.o_kernel = P((L, h, hd, d), ("layers", "heads", "head_dim", "embed"))
        if cfg.attention_bias:
            self.q_bias = P((L, h, hd), ("layers", "heads", "head_dim"), "zeros")
            self.k_bias = P((L, kv, hd), ("layers", "kv_heads", "head_dim"), "zeros")
            self.v_bias = P((L, kv, hd), ("layers", "kv_heads", "head_dim"), "zeros")
        if cfg.o_proj_bias:
            self.o_bias = P((L, d), ("layers", "embed"), "zeros")
        self.mlp_norm = P((L, d), ("layers", "embed"), "ones")
        self.gate_kernel = P((L, d, f), ("layers", "embed", "mlp"))
        self.up_kernel = P((L, d, f), ("layers", "embed", "mlp"))
        self.down_kernel = P((L, f, d), ("layers", "mlp", "embed"))
        if cfg.mlp_bias:
            self.gate_bias = P((L, f), ("layers", "mlp"), "zeros")
            self.up_bias = P((L, f), ("layers", "mlp"), "zeros")
            self.down_bias = P((L, d), ("layers", "embed"), "zeros")


    def __call__(self, x, cos, sin, mask, kv_cache, cache_index, dtype, remat_policy, attention_impl,
                 segment_ids=None, dropout_rng=None):
        """`mask` is the causal same-segment mask; `segment_ids` (no cache only) lets a fused
        attention impl use the segments instead (layers.dot_product_attention)."""
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        # every stacked param, whatever the config added (biases) or quantization (`*_scale`);
        # the LoRA adapters (a sub-module) ride along as one more stacked dict
        stacked = {k: v[...] for k, v in nnx.state(self, nnx.Param).items() if k != "lora"}
        lcfg = None if self.lora is None else self.lora.config
        if self.lora is not None:
            stacked["lora"] = self.lora.stacked()
        drop = lcfg is not None and lcfg.dropout > 0 and dropout_rng is not None
        if drop:  # one key per layer, scanned with the params; one per projection inside the layer
            stacked["lora_rng"] = jax.random.split(dropout_rng, cfg.num_layers)

        def bias(p, name):
            return p[name].astype(dtype) if name in p else 0

        def layer(x, xs):
            p, kv = xs

            def c(name):  # a kernel in the compute dtype (dequantized when stored as int8/int4)
                scale = p.get(name + "_scale")
                return p[name].astype(dtype) if scale is None else dequantize(p[name], scale, dtype)

            def lin(name, inp, spec):  # x W (+ b) (+ the LoRA adapter's scale * (x A) B)
                out = jnp.einsum(spec, inp, c(name + "_kernel")) + bias(p, name + "_bias")
                ad = p.get("lora", {})
                if name + "_a" not in ad:
                    return out
                rng = jax.random.fold_in(p["lora_rng"], lora_lib.PROJECTIONS.index(name)) if drop else None
                return out + lora_lib.delta(inp, ad[name + "_a"], ad[name + "_b"], lcfg.scale, dtype,
                                            lcfg.dropout, rng)

            y = rms_norm(x, p["attn_norm"], eps)
            q = lin("q", y, "bld,dhk->blhk")
            k = lin("k", y, "bld,dhk->blhk")
            v = lin("v", y, "bld,dhk->blhk")
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            # names for the `save_qkv_out` remat policy
            q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
            if kv is not None:  # write the new keys/values into the cache, attend over all slots
                k_all = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, cache_index, 0, 0))
                v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, cache_index, 0, 0))
                a = dot_product_attention(q, k_all.astype(dtype), v_all.astype(dtype), mask, attention_impl)
                new_kv = (k_all, v_all)
            else:
                a = dot_product_attention(q, k, v, mask, attention_impl, segment_ids=segment_ids, causal=True,
                                          window=cfg.sliding_window)
                new_kv = None
            a = checkpoint_name(a, "attn_out")
            x = x + lin("o", a, "blhk,hkd->bld")
            y = rms_norm(x, p["mlp_norm"], eps)
            gate = lin("gate", y, "bld,df->blf")
            up = lin("up", y, "bld,df->blf")
            x = x + checkpoint_name(lin("down", jax.nn.silu(gate) * up, "blf,fd->bld"), "mlp_out")
            return x, new_kv

        x, new_kv = jax.lax.scan(maybe_remat(layer, remat_policy), x, (stacked, kv_cache))
        return x, new_kv
