"""LoRA adapters on the LLM's linear layers (the `llm/layers/lora/` param subtree).

A target kernel W (one of the decoder's q, k, v, o, gate, up, down projections, stacked over
layers) gets two params, `{name}_a` [layers, *in, r] and `{name}_b` [layers, r, *out], and its
output becomes `x W + scale * (dropout(x) A) B` with scale = alpha / r (alpha / sqrt(r) with
rsLoRA), as PEFT's `LoraLayer` computes it. The adapters are separate params beside the base
kernels, so the trainer's freezing needs nothing new: `trainable=(r".*lora.*", r"projector/.*")`
trains them, the base kernels stay frozen (stop_gradient, no optimizer state) and bit-identical.

Init follows PEFT's default (`init_lora_weights=True`): A kaiming-uniform with a=sqrt(5), i.e.
uniform(+-1/sqrt(fan_in)), B zeros, so a fresh adapter changes nothing.

Which kernels carry adapters is a regex table over the base kernels' param paths
(`llm/layers/q_kernel`, ...), like every other param policy (`models/params.py`).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models.layers import make_param
from llava_jax.models.params import PathPatterns

# The decoder's linear layers an adapter can sit on, in the order of a layer's forward pass.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
DEFAULT_TARGETS = (r"llm/layers/(q|k|v|o|gate|up|down)_kernel",)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input only (PEFT's lora_dropout); needs a dropout rng
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank (PEFT use_rslora)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # regexes over the base kernels' param paths

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.modules:
            raise ValueError(f"the LoRA targets {list(self.targets)} match none of the LLM's linear layers "
                             f"({', '.join(f'llm/layers/{n}_kernel' for n in PROJECTIONS)})")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def modules(self) -> tuple[str, ...]:
        """The projections (`PROJECTIONS` names) whose kernel path a target regex matches."""
        match = PathPatterns(self.targets)
        return tuple(n for n in PROJECTIONS if match(f"llm/layers/{n}_kernel"))

    @classmethod
    def from_config(cls, c) -> "LoraConfig | None":
        """From the training config's `lora` group (`train/defaults.py`); rank 0 = no LoRA."""
        if c is None or not c.get("rank"):
            return None
        return cls(rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.get("dropout", 0.0)),
                   rslora=bool(c.get("rslora", False)), targets=tuple(c.get("targets", DEFAULT_TARGETS)))


def io_dims(text_cfg) -> dict[str, tuple[tuple, tuple, tuple, tuple]]:
    """Per projection: (input dims, their logical axes, output dims, their logical axes), the
    kernel's own split (llama.LlamaLayers): the adapter's A takes the kernel's input axes, B its
    output axes, so FSDP / tensor parallelism shard A and B like the kernel they sit beside."""
    t = text_cfg
    d, f, h, kv, hd = t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads, t.head_dim
    emb = ((d,), ("embed",))
    return {
        "q": emb + ((h, hd), ("heads", "head_dim")),
        "k": emb + ((kv, hd), ("kv_heads", "head_dim")),
        "v": emb + ((kv, hd), ("kv_heads", "head_dim")),
        "o": ((h, hd), ("heads", "head_dim")) + emb,
        "gate": emb + ((f,), ("mlp",)),
        "up": emb + ((f,), ("mlp",)),
        "down": ((f,), ("mlp",)) + emb,
    }


class LoraAdapters(nnx.Module):
    """The adapters of every decoder layer, stacked on the leading `layers` axis like the kernels.
    The rank axis has its own logical name, `lora_rank`: the rules table splits it over `fsdp`
    (`llava_jax/sharding.py`), so the factors that have no `embed` axis shard on FSDP meshes too."""

    def __init__(self, text_cfg, lora: LoraConfig, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.config = lora
        dims = io_dims(text_cfg)
        n, r = text_cfg.num_layers, lora.rank
        for name in lora.modules:
            in_shape, in_axes, out_shape, out_axes = dims[name]
            bound = 1.0 / math.sqrt(math.prod(in_shape))  # kaiming_uniform_(a=sqrt(5)) on [r, fan_in]
            setattr(self, f"{name}_a", make_param(rngs, (n, *in_shape, r), ("layers", *in_axes, "lora_rank"),
                                                  "uniform", param_dtype, std=bound))
            setattr(self, f"{name}_b", make_param(rngs, (n, r, *out_shape), ("layers", "lora_rank", *out_axes),
                                                  "zeros", param_dtype))

    def stacked(self) -> dict:
        return {k: v[...] for k, v in nnx.state(self, nnx.Param).items()}


def delta(x, a, b, scale: float, dtype, dropout: float = 0.0, rng=None):
    """scale * (dropout(x) A) B for one layer: x [B, L, *in], a [*in, r], b [r, *out] ->
    [B, L, *out], in the compute dtype (PEFT casts x to the adapter's dtype likewise)."""
    nb = x.ndim - (a.ndim - 1)
    if dropout and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    lead = x.shape[:nb]
    xa = x.reshape(lead + (-1,)) @ a.reshape(-1, a.shape[-1]).astype(dtype)
    out = (xa @ b.reshape(b.shape[0], -1).astype(dtype)).reshape(lead + b.shape[1:])
    return out * jnp.asarray(scale, dtype)


def merged_kernel(kernel, a, b, scale: float):
    """kernel + scale * A B over the stacked layers (in fp32, cast back to the kernel's dtype):
    what PEFT's merge_and_unload writes into the base weight."""
    n, r = a.shape[0], a.shape[-1]
    ab = jnp.matmul(a.reshape(n, -1, r).astype(jnp.float32), b.reshape(n, r, -1).astype(jnp.float32))
    return (kernel.astype(jnp.float32) + scale * ab.reshape(kernel.shape)).astype(kernel.dtype)


LORA_PREFIX = "llm/layers/lora/"


def merged_flat(flat: dict, lora: LoraConfig) -> dict:
    """{param path: array} of a model with adapters -> the same without them, each adapted kernel
    replaced by `merged_kernel` (what an export or `convert.peft.merge` writes)."""
    out = {p: v for p, v in flat.items() if not p.startswith(LORA_PREFIX)}
    for name in lora.modules:
        a, b = flat.get(f"{LORA_PREFIX}{name}_a"), flat.get(f"{LORA_PREFIX}{name}_b")
        if a is None:  # adapters absent from this tree (a partial state): nothing to merge
            continue
        kernel = f"llm/layers/{name}_kernel"
        out[kernel] = merged_kernel(out[kernel], a, b, lora.scale)
    return out
