"""Params, freezing, optimizer and the compiled train step.

Freezing is two things at once:
  * frozen subtrees enter the loss through `jax.lax.stop_gradient` and are not differentiated
    (no backward work for their weights, no gradient buffers);
  * the optimizer is built over the TRAINABLE subtree only, so frozen params carry no optimizer
    state at all. This is the stricter form of `optax.multi_transform(..., set_to_zero())`:
    that keeps zero-sized state but still needs full-size zero gradients for the frozen
    leaves; here they never exist. Stage 1 allocates Adam moments for the projector only.
Which params train is a regex table over param paths (`vision/...`, `projector/...`, `llm/...`)
in the config, never `if name == ...` in code.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llava_jax.config import projector_depth
from llava_jax.models.llava import LlavaModel, chunked_loss_fn, loss_fn_from_logits
from llava_jax.models.params import PathPatterns, path_str  # noqa: F401 - path_str: the public name

# Params never decayed: norms and biases (as HF Trainer excludes LayerNorm weights and biases).
NO_DECAY_PATTERNS = (r".*norm.*", r".*_scale$", r".*_bias$", r".*bias$")


def trainable_filter(patterns: Sequence[str]):
    """nnx filter: a Param whose path fully matches one of the regexes trains."""
    trains = PathPatterns(patterns)

    def f(path, value):
        return isinstance(value, nnx.Param) and trains(path)

    return f


def split_model(model: LlavaModel, trainable_patterns: Sequence[str]):
    """(graphdef, trainable State, frozen State)."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(trainable_patterns), ...)
    if not jax.tree.leaves(trainable):
        raise ValueError(f"no param matches the trainable patterns {list(trainable_patterns)}")
    # an integer param (a QLoRA base's int8 / int4 kernel) has no gradient: jax.grad would refuse it
    ints = [path_str(p) for p, v in nnx.to_flat_state(trainable)
            if not jnp.issubdtype(v.get_value().dtype, jnp.inexact)]
    if ints:
        raise ValueError(f"the trainable patterns {list(trainable_patterns)} match params stored as integers, which "
                         f"cannot train: {ints[:5]}. A quantized base (model.base_quant) stays frozen: train LoRA "
                         "adapters on it (trainable=('.*lora.*', 'projector/.*'))")
    return graphdef, trainable, frozen


# Frozen params kept in fp32 by `cast_frozen`: the ones used in fp32 (LayerNorm scale/bias) or
# transformed before the cast (position embeddings are interpolated for other image sizes).
FP32_FROZEN_PATTERNS = (r".*(pre_ln|post_ln|ln\d)_(scale|bias)", r".*pos_embed", r".*norm.*")


def cast_frozen(frozen, dtype, keep_patterns: Sequence[str] = FP32_FROZEN_PATTERNS):
    """Frozen params stored in the compute `dtype` (bf16): every use casts them to it anyway
    (matmul kernels, biases, embeddings, RMSNorm weights), so results are unchanged while frozen
    memory halves and the per-step fp32->bf16 casts of e.g. the CLIP tower (stage 1 and 2) and the
    LLM (stage 1) disappear. Params matching `keep_patterns` stay as they are."""
    kept = PathPatterns(keep_patterns)

    def cast(path, x):
        keep = kept(path) or not jnp.issubdtype(x.dtype, jnp.floating)
        if keep:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):  # abstract params (tools/aot.py's will-it-fit)
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, frozen)


def count_params(state) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


# ---------------------------------------------------------------- optimizer
def lr_schedule(lr: float, total_steps: int, warmup_ratio: float = 0.03, warmup_steps: int | None = None,
                kind: str = "cosine"):
    """Linear warmup from 0 then cosine to 0 (HF `get_cosine_schedule_with_warmup`), or constant."""
    warm = warmup_steps if warmup_steps is not None else math.ceil(warmup_ratio * total_steps)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(total_steps, warm + 1), 0.0)
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
    raise ValueError(f"unknown lr schedule {kind!r}; use cosine or constant")


def decay_mask(trainable_state):
    no_decay = PathPatterns(NO_DECAY_PATTERNS)

    def mask(path, _):
        return not no_decay(path)

    return jax.tree_util.tree_map_with_path(mask, trainable_state)


def lr_groups(optim_cfg, trainable_state):
    """({group: lr}, the group label of every trainable param): `optim.group_lr` is a table of
    (regex over param paths, lr), first match wins; "default" (optim.lr) takes the rest."""
    table = [(PathPatterns([pattern]), float(lr)) for pattern, lr in (optim_cfg.get("group_lr") or ())]
    lrs = {"default": float(optim_cfg.lr)}

    def label(path, _):
        for i, (match, lr) in enumerate(table):
            if match(path):
                lrs[f"group{i}"] = lr
                return f"group{i}"
        return "default"

    return lrs, jax.tree_util.tree_map_with_path(label, trainable_state)


def make_optimizer(optim_cfg, total_steps: int, trainable_state):
    """Global-norm clipping over all trainable params, then AdamW; with `optim.group_lr`, one
    AdamW per learning-rate group (`optax.multi_transform`), each with the same schedule shape."""
    def schedule_for(lr):
        return lr_schedule(lr, total_steps, optim_cfg.warmup_ratio, optim_cfg.get("warmup_steps"),
                           optim_cfg.get("schedule", "cosine"))

    def adamw(lr):  # the decay mask is a function: under multi_transform it sees its group's params only
        return optax.adamw(schedule_for(lr), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask)

    lrs, labels = lr_groups(optim_cfg, trainable_state)
    if len(lrs) == 1:
        update = adamw(lrs["default"])
    else:
        update = optax.multi_transform({g: adamw(lr) for g, lr in lrs.items()}, labels)
    tx = optax.chain(
        optax.clip_by_global_norm(optim_cfg.grad_clip) if optim_cfg.grad_clip else optax.identity(),
        update,
    )
    return tx, schedule_for(float(optim_cfg.lr))


def opt_state_shardings(tx, trainable, mesh):
    """Shardings for `tx.init(trainable)`: every moment shaped like a param takes that param's
    sharding, the rest (step counts) is replicated. Left to XLA, freshly zeroed moments depend on
    no input and may land on one device (then replicated: 8 bytes per param on every device)."""
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
    # Under `multi_transform` (optim.group_lr) each group's moments hold `MaskedNode`s where the
    # other groups' params are: taken as leaves, they stay as they are.
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, jax.eval_shape(tx.init, trainable),
                                 param_shardings, transform_non_params=lambda _: replicated, is_leaf=masked)


# ---------------------------------------------------------------- loss / step
def batch_loss(trainable, frozen, graphdef, batch, loss_chunk: int = 0, dropout_rng=None):
    """(sum of token losses, number of supervised tokens) for one (micro-)batch.

    `batch["targets"]` is already shifted (target of token t at position t, -100 = ignore).
    `loss_chunk`: the vocabulary loss over chunks of this many positions (0 = the full [B, L, V]
    logits); equal loss and gradients (`llava_jax.models.llava.chunked_loss_fn`).
    `dropout_rng`: the key for LoRA dropout (None: none)."""
    model = nnx.merge(graphdef, trainable, jax.lax.stop_gradient(frozen))
    out = model(batch["input_ids"], images=batch.get("images"), image_mask=batch.get("image_mask"),
                tiles=batch.get("tiles"), image_index=batch.get("image_index"),  # AnyRes rows
                positions=batch["positions"], segment_ids=batch["segment_ids"], return_hidden=bool(loss_chunk),
                dropout_rng=dropout_rng)
    if loss_chunk:  # logits over the vocabulary a chunk of positions at a time (no [B, L, V] buffer)
        return chunked_loss_fn(out, batch["targets"], model.llm.logits, loss_chunk)
    return loss_fn_from_logits(out, batch["targets"])


def make_train_step(graphdef, tx, schedule, grad_accum: int = 1, loss_chunk: int = 0, dropout_seed: int | None = None):
    """step(trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, metrics).

    The batch is split into `grad_accum` micro-batches (strided, so each stays spread over the
    data-parallel devices); gradients of the summed token loss are accumulated and divided once
    by the total supervised-token count of the whole batch: k micro-batches == one big batch.
    `dropout_seed` (LoRA dropout): each step's key is derived from it and the step number, each
    micro-batch's from that and its index, so a resumed run draws the same masks.
    """

    def grads_of(trainable, frozen, mb, rng=None):
        (s, n), g = jax.value_and_grad(batch_loss, has_aux=True)(trainable, frozen, graphdef, mb, loss_chunk, rng)
        return s, n, g

    def step_fn(trainable, opt_state, frozen, batch, step):
        rng = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), step)
        if grad_accum == 1:
            s, n, g = grads_of(trainable, frozen, batch, rng)
        else:
            def split(x):
                b = x.shape[0]
                if b % grad_accum:
                    raise ValueError(f"batch {b} not divisible by grad_accum {grad_accum}")
                return jnp.swapaxes(x.reshape((b // grad_accum, grad_accum) + x.shape[1:]), 0, 1)

            micro = jax.tree.map(split, batch)

            def body(carry, xs):
                s0, n0, g0 = carry
                mb, i = xs
                s, n, g = grads_of(trainable, frozen, mb, None if rng is None else jax.random.fold_in(rng, i))
                return (s0 + s, n0 + n, jax.tree.map(jnp.add, g0, g)), None

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), zeros)
            (s, n, g), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
        denom = jnp.maximum(n, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda x: x / denom, g)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {
            "loss": s / denom,
            "tokens": n,
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(step),
        }
        return trainable, opt_state, metrics

    return step_fn


def step_flops(cfg, trains: set[str], llm_tokens: int, num_images: int, seq_len: int) -> float:
    """Model FLOPs of one train step (the MFU numerator), written down:

      per LLM token:  m * N_llm + a * 2 * layers * seq_len * heads * head_dim   (attention, causal)
                      m = 6 when the LLM trains (fwd 2N + bwd 4N), 4 when frozen but
                      back-propagated through (stage 1: gradients reach the projector), and
                      a = 3 / 2 likewise (fwd 1 + bwd 2 / fwd 1 + bwd 1);
      per image:      vision forward only (frozen, inputs need no grad): 2 * N_vision_run * patches
                      + attention, x3 if the tower trains; projector 6 * N_proj * image_tokens.
      LoRA adapters (`trains` holds "lora"): 6 * N_adapters per LLM token, on top of the LLM's 4N
      (frozen, but back-propagated through: the adapters' inputs need its gradients).
    N counts matmul weights (LM head included, embedding lookups excluded); layers after the
    feature layer are not run and not counted.
    """
    t, v = cfg.text, cfg.vision
    per_layer = (t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
                 + t.num_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
    n_llm = t.num_layers * per_layer + t.hidden_size * t.vocab_size
    llm_m, attn_m = (6, 3) if "llm" in trains else (4, 2)
    attn = 2 * t.num_layers * seq_len * t.num_heads * t.head_dim
    llm = llm_tokens * (llm_m * n_llm + attn_m * attn)
    if cfg.lora is not None:
        from llava_jax.models.lora import io_dims

        dims = io_dims(t)
        n_lora = t.num_layers * cfg.lora.rank * sum(math.prod(dims[m][0]) + math.prod(dims[m][2])
                                                    for m in cfg.lora.modules)
        llm += llm_tokens * (6 if "lora" in trains else 2) * n_lora
    run = max(cfg.feature_layers)
    n_vis = run * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    patches = v.num_patches + 1
    vis_m = 3 if "vision" in trains else 1
    vision = num_images * vis_m * (2 * n_vis * patches + 4 * run * patches * patches * v.hidden_size)
    depth = projector_depth(cfg.projector_type)
    n_proj = cfg.projector_in_features * t.hidden_size + (depth - 1) * t.hidden_size**2
    proj = num_images * cfg.num_image_tokens * 6 * n_proj
    return float(llm + vision + proj)


def param_count_by_subtree(state) -> dict[str, int]:
    """Param counts by top-level subtree, LoRA adapters (`llm/layers/lora/...`) as "lora"."""
    out: dict[str, int] = {}
    for path, v in nnx.to_flat_state(state):
        top = "lora" if "lora" in map(str, path) else str(path[0])
        out[top] = out.get(top, 0) + math.prod(v.value.shape)
    return out
