"""Weight-only quantization of the LLM's linear layers, chosen at load time (`--quantize`):
int8 per output channel or int4 per group of 64 input features. The quantizer itself lives in
`llava_jax.models.quant` (QLoRA training stores its frozen base with it too); this module adds
what serving measures: storage size, logits agreement and round-trip error.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models.params import path_str
from llava_jax.models.quant import KERNELS, MODES, quantize_array, quantize_model  # noqa: F401 - the public names


def _bits(dtype) -> int:
    return 4 if jnp.dtype(dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else jnp.dtype(dtype).itemsize * 8


def param_bytes(model, subtree: str | None = None, linear_only: bool = False) -> int:
    """Bytes the params (under `subtree`; `linear_only`: the LLM's quantizable kernels and their
    scales) take at their storage width (int4 counted as 4 bits; the CPU backend
    actually holds int4 in a byte each, TPU and GPU pack two per byte)."""
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        p = path_str(path)
        if subtree and not p.startswith(subtree):
            continue
        name = p.rsplit("/", 1)[-1]
        if linear_only and (not p.startswith("llm/") or name.removesuffix("_scale") not in KERNELS):
            continue
        v = var.get_value()
        total += int(np.prod(v.shape)) * _bits(v.dtype) // 8
    return total


def compare_logits(ref, test):
    """Cosine similarity per position (mean, min) and top-1 agreement of two logits arrays [..., V]."""
    a = np.asarray(ref, np.float64).reshape(-1, np.shape(ref)[-1])
    b = np.asarray(test, np.float64).reshape(-1, np.shape(test)[-1])
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    agree = (a.argmax(-1) == b.argmax(-1)).mean()
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "top1_agreement": float(agree)}


def dequantize_roundtrip_error(model, mode: str, group_size: int = 64) -> float:
    """Largest relative error |dequant(quant(w)) - w| / max|w| over the quantized kernels."""
    from llava_jax.models.layers import dequantize

    worst = 0.0
    for name, (in_axes, group_axis) in KERNELS.items():
        w = jnp.asarray(getattr(model.llm.layers, name)[...], jnp.float32)
        q, s = quantize_array(w, mode, in_axes, group_axis, group_size)
        worst = max(worst, float(jnp.max(jnp.abs(dequantize(q, s, jnp.float32) - w)) / jnp.max(jnp.abs(w))))
    return worst


def quantized_copy(model, mode: str, group_size: int = 64):
    """A quantized copy of `model` (the original is left untouched)."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    return quantize_model(copy, mode, group_size)
