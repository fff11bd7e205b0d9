"""LLaMA / Vicuna decoder (the `llm/` param subtree).

fp32 RMSNorm, rotate-half RoPE (default / linear / llama3), GQA, SwiGLU, optional attention and
MLP biases, tied or untied LM head. Inputs carry explicit `positions` (RoPE) and `segment_ids`
(attention = causal AND same segment, 0 = padding), so packed rows and padded batches share one
code path. Decoding uses a preallocated KV cache (`init_cache`) written at `cache["index"]`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llava_jax.config import TextConfig
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
                 remat_policy: str = "none", attention_impl: str = "xla", rngs: nnx.Rngs | None = None):
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

    def embed_tokens(self, ids):
        return jnp.take(self.embed.value, ids, axis=0, mode="clip").astype(self.dtype)

    def logits(self, h):
        head = self.embed.value.T if self.cfg.tie_word_embeddings else self.lm_head.value
        return jnp.einsum("bld,dv->blv", h, head.astype(self.dtype))

    def __call__(self, embeds, positions, segment_ids, cache: dict | None = None, return_hidden: bool = False):
        """embeds [B, L, D]; positions, segment_ids [B, L] int.

        Without a cache, query/key slot i is token i. With a cache, the L new tokens occupy slots
        `cache["index"] + arange(L)`; they attend to earlier valid slots of the cache.
        Returns logits [B, L, V] (or final hidden states) and the updated cache (or None).
        """
        b, l, _ = embeds.shape
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg.head_dim, self.cfg.rope), self.dtype)
        if cache is None:
            slots = jnp.arange(l)
            mask = attention_mask(slots, slots, segment_ids, segment_ids, causal=True)
            h, _ = self.layers(embeds.astype(self.dtype), cos, sin, mask, None, None,
                               self.dtype, self.remat_policy, self.attention_impl, segment_ids=segment_ids)
            new_cache = None
        else:
            index = cache["index"]
            cache_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, index))
            q_slots = index + jnp.arange(l)
            k_slots = jnp.arange(cache_seg.shape[1])
            mask = attention_mask(q_slots, k_slots, segment_ids, cache_seg, causal=True)
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
    """All decoder layers, params stacked on a leading `layers` axis."""

    def __init__(self, cfg: TextConfig, P):
        self.cfg = cfg
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
                 segment_ids=None):
        """`mask` is the causal same-segment mask; `segment_ids` (no cache only) lets a fused
        attention impl use the segments instead (layers.dot_product_attention)."""
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        # every stacked param, whatever the config added (biases) or quantization (`*_scale`)
        stacked = {k: v[...] for k, v in nnx.state(self, nnx.Param).items()}

        def bias(p, name):
            return p[name].astype(dtype) if name in p else 0

        def layer(x, xs):
            p, kv = xs

            def c(name):  # a kernel in the compute dtype (dequantized when stored as int8/int4)
                scale = p.get(name + "_scale")
                return p[name].astype(dtype) if scale is None else dequantize(p[name], scale, dtype)

            y = rms_norm(x, p["attn_norm"], eps)
            q = jnp.einsum("bld,dhk->blhk", y, c("q_kernel")) + bias(p, "q_bias")
            k = jnp.einsum("bld,dhk->blhk", y, c("k_kernel")) + bias(p, "k_bias")
            v = jnp.einsum("bld,dhk->blhk", y, c("v_kernel")) + bias(p, "v_bias")
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            # names for the `save_qkv_out` remat policy
            q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
            if kv is not None:  # write the new keys/values into the cache, attend over all slots
                k_all = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, cache_index, 0, 0))
                v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, cache_index, 0, 0))
                a = dot_product_attention(q, k_all.astype(dtype), v_all.astype(dtype), mask, attention_impl)
                new_kv = (k_all, v_all)
            else:
                a = dot_product_attention(q, k, v, mask, attention_impl, segment_ids=segment_ids, causal=True)
                new_kv = None
            a = checkpoint_name(a, "attn_out")
            x = x + jnp.einsum("blhk,hkd->bld", a, c("o_kernel")) + bias(p, "o_bias")
            y = rms_norm(x, p["mlp_norm"], eps)
            gate = jnp.einsum("bld,df->blf", y, c("gate_kernel")) + bias(p, "gate_bias")
            up = jnp.einsum("bld,df->blf", y, c("up_kernel")) + bias(p, "up_bias")
            mlp = checkpoint_name(jnp.einsum("blf,fd->bld", jax.nn.silu(gate) * up, c("down_kernel")), "mlp_out")
            x = x + mlp + bias(p, "down_bias")
            return x, new_kv

        x, new_kv = jax.lax.scan(maybe_remat(layer, remat_policy), x, (stacked, kv_cache))
        return x, new_kv
