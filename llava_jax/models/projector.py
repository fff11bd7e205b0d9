"""Multimodal projector (the `projector/` param subtree): `linear` or `mlp{N}x_gelu`.

`mlp{N}x_gelu` is N linear layers with exact (erf) GELU between them, as in the original LLaVA
(`nn.Sequential(Linear, GELU, Linear, ...)`) and llava-hf (`linear_1`, act, `linear_2`).
LLaVA-NeXT's `image_newline` (the embedding that ends each row of AnyRes tile features,
models/anyres.py) lives here too, as `projector/image_newline`: it is part of the connector, so it
trains, freezes and travels (stage-1 outputs) with the projector under the same path regexes.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from llava_jax.config import projector_depth
from llava_jax.models.layers import gelu_exact, make_param


class Projector(nnx.Module):
    def __init__(self, projector_type: str, in_features: int, out_features: int, use_bias: bool = True,
                 *, image_newline: bool = False, param_dtype=jnp.float32, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.depth = projector_depth(projector_type)
        self.use_bias = use_bias
        self.dtype = dtype
        dims = [in_features] + [out_features] * self.depth
        for i in range(self.depth):
            in_axis = "vision_embed" if i == 0 else "embed"
            setattr(self, f"linear_{i + 1}_kernel",
                    make_param(rngs, (dims[i], dims[i + 1]), (in_axis, "embed"), "normal", param_dtype))
            if use_bias:
                setattr(self, f"linear_{i + 1}_bias",
                        make_param(rngs, (dims[i + 1],), ("embed",), "zeros", param_dtype))
        if image_newline:  # transformers initialises it N(0, 1/hidden)
            self.image_newline = make_param(rngs, (out_features,), ("embed",), "normal", param_dtype,
                                            std=out_features**-0.5)

    def __call__(self, x):
        x = x.astype(self.dtype)
        for i in range(1, self.depth + 1):
            if i > 1:
                x = gelu_exact(x)
            x = jnp.einsum("...i,io->...o", x, getattr(self, f"linear_{i}_kernel").value.astype(self.dtype))
            if self.use_bias:
                x = x + getattr(self, f"linear_{i}_bias").value.astype(self.dtype)
        return x
