"""SigLIP vision tower (transformers' `SiglipVisionModel`), as LLaVA uses it.

Everything after the embeddings is the CLIP tower's (`models/clip.py`): the same pre-LN blocks
(the activation is the config's, `gelu_pytorch_tanh`), the same scan over stacked layers, the same
feature selection. SigLIP's embeddings differ: the patch conv has a bias, there is no class token
(so the position embeddings cover the patch grid only) and no pre-layernorm.

LLaVA takes hidden states of a feature layer (llava-hf SigLIP models: -1 with "full"), so neither
`post_layernorm` nor the attention-pooling head feeds the LLM; transformers computes both and
drops them. Their params are held for checkpoint round trips: `post_layernorm` always (every
SigLIP checkpoint has it), the head only when the checkpoint has it (`vision_use_head`; the
released SigLIP towers do, llava-hf's SigLIP conversions do not). `pool` runs the head, for tests
against `SiglipVisionModel.pooler_output`.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from llava_jax.config import VisionConfig
from llava_jax.models.clip import VisionTower, attention_heads, mlp
from llava_jax.models.layers import activation, layer_norm


class SiglipVisionTower(VisionTower):
    def embedding_params(self, P):
        d = self.cfg.hidden_size
        self.patch_bias = P((d,), ("embed",), "zeros")
        if self.cfg.use_head:
            self.head = PoolingHead(self.cfg, P)

    def embed(self, pixels):
        """pixels [N, H, W, C] float (normalised) -> [N, patches, D]: patches + bias + positions."""
        x, gh, gw = self.patchify(pixels)
        dt = self.dtype
        return x + self.patch_bias.value.astype(dt) + self.position_embeddings(gh, gw).astype(dt)[None]

    def pool(self, last_hidden_state):
        """The pooling head on the post-layernorm output: [N, T, D] -> [N, D]."""
        if not self.cfg.use_head:
            raise ValueError("this SigLIP tower has no pooling head (vision_use_head is false)")
        return self.head(last_hidden_state, self.dtype)


class PoolingHead(nnx.Module):
    """`SiglipMultiheadAttentionPoolingHead`: a learned probe attends over all tokens
    (torch `nn.MultiheadAttention`: packed q/k/v input projection), then a residual MLP block."""

    def __init__(self, cfg: VisionConfig, P):
        self.cfg = cfg
        d, f, h, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
        self.probe = P((1, 1, d), (None, None, "embed"))
        # q, k, v stacked on the leading axis, as torch packs them in `in_proj_weight`.
        self.in_proj_kernel = P((3, d, h, hd), (None, "embed", "heads", "head_dim"))
        self.in_proj_bias = P((3, h, hd), (None, "heads", "head_dim"), "zeros")
        self.o_kernel = P((h, hd, d), ("heads", "head_dim", "embed"))
        self.o_bias = P((d,), ("embed",), "zeros")
        self.norm_scale = P((d,), ("embed",), "ones")
        self.norm_bias = P((d,), ("embed",), "zeros")
        self.fc1_kernel = P((d, f), ("embed", "mlp"))
        self.fc1_bias = P((f,), ("mlp",), "zeros")
        self.fc2_kernel = P((f, d), ("mlp", "embed"))
        self.fc2_bias = P((d,), ("embed",), "zeros")

    def __call__(self, x, dtype=jnp.float32):
        c = lambda v: v.value.astype(dtype)  # noqa: E731
        w, b = c(self.in_proj_kernel), c(self.in_proj_bias)
        probe = jnp.broadcast_to(c(self.probe), (x.shape[0], 1, x.shape[-1]))
        y = attention_heads(probe, w[0], b[0], w[1], b[1], w[2], b[2], c(self.o_kernel), c(self.o_bias), "xla", kv=x)
        z = layer_norm(y, self.norm_scale.value, self.norm_bias.value, self.cfg.layer_norm_eps)
        y = y + mlp(z, c(self.fc1_kernel), c(self.fc1_bias), c(self.fc2_kernel), c(self.fc2_bias),
                    activation(self.cfg.hidden_act))
        return y[:, 0]
