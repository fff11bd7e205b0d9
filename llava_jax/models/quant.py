"""Weight-only quantization of the LLM's linear kernels: the one quantizer that serving
(`serve/quant.py`, `--quantize`) and QLoRA training (a frozen int8 / int4 base under LoRA
adapters, `LlavaConfig.base_quant`) share.

  * `int8`: symmetric, per output channel: scale = max|w| over the input dims / 127.
  * `int4`: symmetric, grouped: groups of `group_size` consecutive input features (within a head
    for the attention output projection), scale = max|w| over the group / 7 (kept in bf16);
    stored as jnp.int4.

Only q/k/v/o and gate/up/down kernels are quantized; embeddings, the LM head, norms, biases, the
vision tower, the projector and LoRA adapters keep their dtype. Each kernel `x` becomes an int
param plus an `x_scale` param with the kernel's logical axes (sharding rules apply unchanged);
the decoder dequantizes one layer at a time inside its scan (`layers.dequantize`), so the
full-precision weights never exist in memory at once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llava_jax.models.layers import dequantize

# kernel -> (input axes of the stacked [layers, ...] kernel, the axis int4 groups run along)
KERNELS = {
    "q_kernel": ((1,), 1), "k_kernel": ((1,), 1), "v_kernel": ((1,), 1),
    "o_kernel": ((1, 2), 2),
    "gate_kernel": ((1,), 1), "up_kernel": ((1,), 1), "down_kernel": ((1,), 1),
}
MODES = ("int8", "int4")
GROUP_SIZE = 64  # int4 group (the largest divisor of the input dim up to this)


def check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; use one of {MODES}")


def _group(n: int, size: int) -> int:
    """The largest divisor of n that is <= size."""
    for g in range(min(size, n), 0, -1):
        if n % g == 0:
            return g
    return 1


def quantize_array(w, mode: str, in_axes, group_axis: int, group_size: int = GROUP_SIZE):
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
    check_mode(mode)


def _placed(fn, w, *rest):
    """fn(w, *rest), its outputs in the shardings that the kernel `w`'s own sharding gives their
    shapes (a scale's input dims are 1: `fit_spec` replicates what no longer divides). Traced
    values (inside an `eval_shape` / `jit` init) and unsharded arrays just run `fn`."""
    sharding = None if isinstance(w, jax.core.Tracer) else getattr(w, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return fn(w, *rest)
    from llava_jax.sharding import fit_spec

    mesh = sharding.mesh
    outs = jax.tree.map(lambda o: jax.sharding.NamedSharding(mesh, fit_spec(sharding.spec, o.shape, mesh)),
                        jax.eval_shape(fn, w, *rest))
    return jax.jit(fn, out_shardings=outs)(w, *rest)


def quantize_layers(layers, mode: str, group_size: int = GROUP_SIZE) -> None:
    """Quantize a `LlamaLayers`' linear kernels in place, one kernel at a time (the fp kernel is
    dropped as its int copy replaces it)."""
    check_mode(mode)
    for name, (in_axes, group_axis) in KERNELS.items():
        if hasattr(layers, name + "_scale"):
            raise ValueError("the LLM's linear layers are already quantized")
        var = getattr(layers, name)
        fn = functools.partial(quantize_array, mode=mode, in_axes=in_axes, group_axis=group_axis,
                               group_size=group_size)
        q, scale = _placed(fn, var[...])
        # `replace` keeps the kernel's metadata (its logical axes) for both new params
        setattr(layers, name, var.replace(q))
        setattr(layers, name + "_scale", var.replace(scale))


def quantize_model(model, mode: str = "int8", group_size: int = GROUP_SIZE):
    """Quantize `model.llm`'s linear layers in place and record it (`config.base_quant`); returns
    the model. A model already stored in `mode` is returned as it is."""
    check_mode(mode)
    have = model.config.base_quant
    if have == mode:
        return model
    if have is not None:
        raise ValueError(f"the model's LLM is stored as {have} already; it cannot be quantized to {mode}")
    quantize_layers(model.llm.layers, mode, group_size)
    model.config = model.config.replace(base_quant=mode)
    return model


def dequantize_model(model):
    """The inverse of `quantize_model` up to its rounding: every quantized kernel back in the
    params' dtype (`runtime.param_dtype`), its scale dropped; in place, returns the model."""
    layers = model.llm.layers
    dtype = model.config.runtime.param_dtype
    for name in KERNELS:
        if not hasattr(layers, name + "_scale"):
            continue
        var, scale = getattr(layers, name), getattr(layers, name + "_scale")
        var.value = _placed(lambda q, s: dequantize(q, s, dtype), var[...], scale[...])
        delattr(layers, name + "_scale")
    model.config = model.config.replace(base_quant=None)
    return model


def dequantized_flat(flat: dict) -> dict:
    """{param path: array} with every quantized LLM kernel (`llm/layers/x` + `x_scale`) replaced by
    its fp32 dequantized value (what an export writes; a no-op for a model that is not quantized)."""
    out = dict(flat)
    for name in KERNELS:
        path = f"llm/layers/{name}"
        scale = out.pop(path + "_scale", None)
        if scale is not None:
            out[path] = dequantize(out[path], scale, jnp.float32)
    return out
