"""CLIP ViT vision tower (the `vision/` param subtree), and the ViT parts SigLIP shares.

Patch conv without bias, class + position embeddings, `pre_layrnorm`, pre-LN transformer blocks
with the config's activation (quick_gelu for CLIP). Layers are stored stacked (leading `layers`
axis) and applied with `lax.scan`, so compile time does not grow with depth. Only the layers up to
the deepest requested feature layer run; `post_layernorm` is kept for checkpoint round-trips but
LLaVA never applies it. `models/siglip.py` subclasses `VisionTower`: only the embeddings differ.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llava_jax.config import VisionConfig
from llava_jax.models.layers import (
    activation,
    dot_product_attention,
    layer_norm,
    make_param,
    maybe_remat,
)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (torch's a = -0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix equal to torch `interpolate(mode='bicubic', align_corners=False)` along one
    axis (border taps clamped), so position-embedding interpolation matches transformers."""
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5
        i0 = int(np.floor(src))
        w = _cubic_weights(np.array(src - i0))
        for tap, wt in zip(range(i0 - 1, i0 + 3), w):
            m[o, min(max(tap, 0), in_size - 1)] += wt
    return m.astype(np.float32)


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype=jnp.float32, dtype=jnp.float32,
                 remat_policy: str = "none", attention_impl: str = "xla", rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        self.dtype = dtype
        self.remat_policy = remat_policy
        self.attention_impl = attention_impl
        activation(cfg.hidden_act)  # an unsupported activation fails here, not at the first call
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        P = lambda shape, axes, init="normal": make_param(rngs, shape, axes, init, param_dtype)  # noqa: E731
        self.patch_embed = P((p, p, c, d), (None, None, None, "embed"))
        self.embedding_params(P)
        self.pos_embed = P((cfg.num_class_tokens + cfg.num_patches, d), (None, "embed"))
        self.post_ln_scale = P((d,), ("embed",), "ones")
        self.post_ln_bias = P((d,), ("embed",), "zeros")
        self.layers = VisionLayers(cfg, P)

    def embedding_params(self, P):
        """The family's own embedding params (CLIP: the class token and `pre_layrnorm`)."""
        d = self.cfg.hidden_size
        self.class_embed = P((d,), ("embed",))
        self.pre_ln_scale = P((d,), ("embed",), "ones")
        self.pre_ln_bias = P((d,), ("embed",), "zeros")

    # ------------------------------------------------------------------ embeddings
    def position_embeddings(self, grid_h: int, grid_w: int):
        pos = self.pos_embed.value
        g, k = self.cfg.grid_size, self.cfg.num_class_tokens
        if (grid_h, grid_w) == (g, g):
            return pos
        # Other image sizes: bicubic interpolation of the patch grid, class position unchanged.
        grid = pos[k:].reshape(g, g, -1)
        mh, mw = bicubic_resize_matrix(g, grid_h), bicubic_resize_matrix(g, grid_w)
        grid = jnp.einsum("hi,wj,ijd->hwd", mh, mw, grid.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST).astype(pos.dtype)
        return jnp.concatenate([pos[:k], grid.reshape(grid_h * grid_w, -1)], axis=0)

    def patchify(self, pixels):
        """pixels [N, H, W, C] float (normalised) -> (patch embeddings [N, patches, D], grid h, w):
        the stride-p conv as one matmul (no bias)."""
        dt, p = self.dtype, self.cfg.patch_size
        n, hh, ww, c = pixels.shape
        gh, gw = hh // p, ww // p
        patches = pixels[:, : gh * p, : gw * p].astype(dt).reshape(n, gh, p, gw, p, c)
        x = jnp.einsum("nhpwqc,pqcd->nhwd", patches, self.patch_embed.value.astype(dt))
        return x.reshape(n, gh * gw, -1), gh, gw

    def embed(self, pixels):
        """pixels [N, H, W, C] float (normalised) -> [N, 1 + patches, D] after pre_layrnorm."""
        cfg, dt = self.cfg, self.dtype
        x, gh, gw = self.patchify(pixels)
        cls = jnp.broadcast_to(self.class_embed.value.astype(dt), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings(gh, gw).astype(dt)[None]
        return layer_norm(x, self.pre_ln_scale.value, self.pre_ln_bias.value, cfg.layer_norm_eps)

    # ------------------------------------------------------------------ forward
    def __call__(self, pixels, feature_layers: tuple[int, ...], select_strategy: str = "default"):
        """Features of the requested hidden-state indices (0 = embeddings, i = after layer i),
        concatenated on features; CLS dropped for "default". Deeper layers are not computed."""
        x = self.embed(pixels)
        n_run = max(feature_layers)
        want = sorted(set(feature_layers))
        if len(want) == 1:
            states = {n_run: self.layers(x, n_run, self.dtype, self.remat_policy, self.attention_impl)[0]}
            states[0] = x
        else:
            _, all_states = self.hidden_states(x, n_run)
            states = {i: all_states[i] for i in want}
        feats = jnp.concatenate([states[i] for i in feature_layers], axis=-1)
        return feats[:, 1:] if select_strategy == "default" else feats

    def hidden_states(self, x, n_layers: int | None = None):
        """Embeddings -> (last, [emb, after layer 1, ..., after layer n]) like transformers'
        `output_hidden_states` (used for multi-layer features and tests)."""
        n_layers = self.cfg.num_layers if n_layers is None else n_layers
        last, ys = self.layers(x, n_layers, self.dtype, self.remat_policy, self.attention_impl, collect=True)
        return last, [x] + [ys[i] for i in range(n_layers)]

    def post_norm(self, x):
        """`post_layernorm`: transformers' `last_hidden_state` (LLaVA's features never take it)."""
        return layer_norm(x, self.post_ln_scale.value, self.post_ln_bias.value, self.cfg.layer_norm_eps)


def attention_heads(y, q_kernel, q_bias, k_kernel, k_bias, v_kernel, v_bias, o_kernel, o_bias, attention_impl: str,
                    kv=None, residual=0.0):
    """`residual` + multi-head attention of a ViT block (biased projections, no mask), `kv` the
    key/value inputs (default: `y`, self-attention); the SigLIP pooling head reuses it with its
    probe. The sum runs as (residual + attention) + o_bias: the association the demo's figures
    were measured with (another order rounds differently and moves them)."""
    kv = y if kv is None else kv
    q = jnp.einsum("btd,dhk->bthk", y, q_kernel) + q_bias
    k = jnp.einsum("btd,dhk->bthk", kv, k_kernel) + k_bias
    v = jnp.einsum("btd,dhk->bthk", kv, v_kernel) + v_bias
    q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))  # for the `save_qkv_out` policy
    a = checkpoint_name(dot_product_attention(q, k, v, None, attention_impl), "attn_out")
    return residual + jnp.einsum("bthk,hkd->btd", a, o_kernel) + o_bias


def mlp(y, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, act, residual=0.0):
    """`residual` + fc2(act(fc1(y))) of a ViT block, summed as attention_heads says."""
    y = act(jnp.einsum("btd,df->btf", y, fc1_kernel) + fc1_bias)
    return residual + checkpoint_name(jnp.einsum("btf,fd->btd", y, fc2_kernel), "mlp_out") + fc2_bias


class VisionLayers(nnx.Module):
    """All encoder layers, params stacked on a leading `layers` axis."""

    def __init__(self, cfg: VisionConfig, P):
        self.cfg = cfg
        L, d, f, h, hd = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
        self.ln1_scale = P((L, d), ("layers", "embed"), "ones")
        self.ln1_bias = P((L, d), ("layers", "embed"), "zeros")
        self.q_kernel = P((L, d, h, hd), ("layers", "embed", "heads", "head_dim"))
        self.q_bias = P((L, h, hd), ("layers", "heads", "head_dim"), "zeros")
        self.k_kernel = P((L, d, h, hd), ("layers", "embed", "heads", "head_dim"))
        self.k_bias = P((L, h, hd), ("layers", "heads", "head_dim"), "zeros")
        self.v_kernel = P((L, d, h, hd), ("layers", "embed", "heads", "head_dim"))
        self.v_bias = P((L, h, hd), ("layers", "heads", "head_dim"), "zeros")
        self.o_kernel = P((L, h, hd, d), ("layers", "heads", "head_dim", "embed"))
        self.o_bias = P((L, d), ("layers", "embed"), "zeros")
        self.ln2_scale = P((L, d), ("layers", "embed"), "ones")
        self.ln2_bias = P((L, d), ("layers", "embed"), "zeros")
        self.fc1_kernel = P((L, d, f), ("layers", "embed", "mlp"))
        self.fc1_bias = P((L, f), ("layers", "mlp"), "zeros")
        self.fc2_kernel = P((L, f, d), ("layers", "mlp", "embed"))
        self.fc2_bias = P((L, d), ("layers", "embed"), "zeros")

    def __call__(self, x, n_layers: int, dtype, remat_policy: str, attention_impl: str, collect: bool = False):
        eps = self.cfg.layer_norm_eps
        act = activation(self.cfg.hidden_act)
        stacked = {k: v[...][:n_layers] for k, v in nnx.state(self, nnx.Param).items()}  # every stacked param

        def layer(x, p):
            c = lambda *names: [p[name].astype(dtype) for name in names]  # noqa: E731
            y = layer_norm(x, p["ln1_scale"], p["ln1_bias"], eps)
            x = attention_heads(y, *c("q_kernel", "q_bias", "k_kernel", "k_bias", "v_kernel", "v_bias",
                                      "o_kernel", "o_bias"), attention_impl, residual=x)
            y = layer_norm(x, p["ln2_scale"], p["ln2_bias"], eps)
            x = mlp(y, *c("fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias"), act, residual=x)
            return x, (x if collect else None)

        if n_layers == 0:
            return x, []
        return jax.lax.scan(maybe_remat(layer, remat_policy), x, stacked)
