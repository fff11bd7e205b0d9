"""Weight-only quantization of the LLM's linear layers, chosen at load time.

  * `int8`: symmetric, per output channel: scale = max|w| over the input dims / 127.
  * `int4`: symmetric, grouped: groups of `group_size` consecutive input features (within a head
    for the attention output projection), scale = max|w| over the group / 7 (kept in bf16);
    stored as jnp.int4.

Only q/k/v/o and gate/up/down kernels are quantized; embeddings, the LM head, norms, biases, the
vision tower and the projector stay in their original dtype. Each kernel `x` becomes an int
param plus an `x_scale` param (same logical axes, so sharding rules apply unchanged); the decoder
dequantizes one layer at a time inside its scan (`llava_jax.models.layers.dequantize`), so the
full-precision weights never exist in memory at once. Activations and the KV cache keep the
compute dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models.params import path_str

# kernel -> (input axes of the stacked [layers, ...] kernel, the axis int4 groups run along)
KERNELS = {
    "q_kernel": ((1,), 1), "k_kernel": ((1,), 1), "v_kernel": ((1,), 1),
    "o_kernel": ((1, 2), 2),
    "gate_kernel": ((1,), 1), "up_kernel": ((1,), 1), "down_kernel": ((1,), 1),
}
MODES = ("int8", "int4")


def _group(n: int, size: int) -> int:
    """The largest divisor of n that is <= size."""
    for g in range(min(size, n), 0, -1):
        if n % g == 0:
            return g
    return 1


def quantize_array(w, mode: str, in_axes, group_axis: int, group_size: int = 64):
    """-> (values int8 / int4 with w's shape, scale (fp32 for int8, bf16 for int4) broadcastable
    per `dequantize`)."""
    w = jnp.asarray(w, jnp.float32)
    if mode == "int8":
        amax = jnp.max(jnp.abs(w), axis=in_axes, keepdims=True)
        scale = jnp.where(amax > 0, amax / 127.0, 1.0)
        q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
        return q, scale
    if mode == "int4":
        n = w.shape[group_axis]
        g = _group(n, group_size)
        shape = w.shape[:group_axis] + (n // g, g) + w.shape[group_axis + 1:]
        wg = w.reshape(shape)
        amax = jnp.max(jnp.abs(wg), axis=group_axis + 1, keepdims=True)
        scale = jnp.where(amax > 0, amax / 7.0, 1.0)
        scale = scale.astype(jnp.bfloat16)  # per-group scales in bf16: their error << one int4 step
        q = jnp.clip(jnp.round(wg / scale.astype(jnp.float32)), -8, 7).astype(jnp.int4).reshape(w.shape)
        return q, scale.reshape(shape[:group_axis + 1] + shape[group_axis + 2:])
    raise ValueError(f"unknown quantization {mode!r}; use one of {MODES}")


def quantize_model(model, mode: str = "int8", group_size: int = 64):
    """Quantize `model.llm`'s linear layers in place (see module docstring); returns the model."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; use one of {MODES}")
    layers = model.llm.layers
    for name, (in_axes, group_axis) in KERNELS.items():
        var = getattr(layers, name)
        if hasattr(layers, name + "_scale"):
            raise ValueError("the model is already quantized")
        q, scale = quantize_array(var[...], mode, in_axes, group_axis, group_size)
        # `replace` keeps the kernel's metadata (its logical axes) for both new params
        setattr(layers, name, var.replace(q))
        setattr(layers, name + "_scale", var.replace(scale))
    return model


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
