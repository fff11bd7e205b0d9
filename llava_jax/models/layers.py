"""Building blocks shared by the CLIP and LLaMA modules: params with logical axes, norms,
rotary embeddings, masked attention, remat policies.

Every parameter is an `nnx.Param` whose NNX sharding metadata `out_sharding` names its logical
axes (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`, `layers`, ...), so NNX's own tools
(`nnx.get_partition_spec`, `nnx.logical_axis_rules`) read them. The single rules table in
`llava_jax.sharding` maps those to mesh axes; nothing here knows about meshes.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Large negative used instead of -inf so fully-masked rows (padding queries) stay finite.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def make_param(rngs: nnx.Rngs | None, shape, axes, init: str = "normal", dtype=jnp.float32, std: float = 0.02):
    """A parameter whose `out_sharding` metadata is its logical `axes`. `rngs=None` gives zeros
    (used under eval_shape). `std`: the normal's standard deviation, or for `init="uniform"` the
    half-width of the uniform interval (LoRA's kaiming-uniform A)."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros" or rngs is None:
        value = jnp.zeros(shape, dtype)
    elif init == "normal":
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    elif init == "uniform":
        value = jax.random.uniform(rngs.params(), shape, jnp.float32, -std, std).astype(dtype)
    else:
        raise ValueError(init)
    # eager_sharding=False: params are created without a mesh (the trainer jits their init with
    # `out_shardings` from `llava_jax.sharding`); NNX's default would place each one on creation
    # and raise without a mesh context, or with one apply the unfitted spec (`sharding.fit_spec`).
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def dequantize(q, scale, dtype):
    """Weight-only quantized kernel -> `dtype`: `q` (int8/int4) times `scale`, whose dims are 1
    (per-channel over that axis), equal to q's, or q's divided by a group size (grouped)."""
    for axis, (n, m) in enumerate(zip(q.shape, scale.shape)):
        if m not in (1, n):
            scale = jnp.repeat(scale, n // m, axis=axis)
    return q.astype(dtype) * scale.astype(dtype)


# ---------------------------------------------------------------- remat
# Primitives of the fused attention kernels: cuDNN's forward (`dot_product_attention_fwd[_wrapper]`)
# and the Pallas kernel's custom_vjp (the only custom_vjp in these models).
_ATTENTION_KERNEL_PRIMS = ("dot_product_attention_fwd", "custom_vjp_call", "pallas_call")


def _dots_and_attention_saveable(prim, *_, **__):
    """Save matmul outputs and the fused attention kernels' outputs and residuals: under plain
    `dots` the backward pass runs the cuDNN / Pallas attention forward a second time to get them
    back (tests/test_perf_levers.py counts the kernels in the CUDA lowering)."""
    return prim.name == "dot_general" or prim.name.startswith(_ATTENTION_KERNEL_PRIMS)


REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation: save every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer in backward
    "dots": jax.checkpoint_policies.checkpoint_dots,  # save matmul outputs
    "dots_attn": _dots_and_attention_saveable,  # matmul outputs + fused attention (no 2nd attention fwd)
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_out": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out", "mlp_out"),
}


def maybe_remat(fn: Callable, policy_name: str) -> Callable:
    """The per-layer body for `lax.scan`: rematerialised by `policy_name`, its carry (the
    residual stream) pinned to the batch sharding when `batch_sharded_activations` is active."""
    if policy_name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy_name!r}; known: {sorted(REMAT_POLICIES)}")
    fn = _carry_batch_sharded(fn)
    if policy_name == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy_name], prevent_cse=False)


# ---------------------------------------------------------------- activation sharding
_BATCH_SHARDING: contextvars.ContextVar = contextvars.ContextVar("llava_jax_batch_sharding", default=None)


@contextlib.contextmanager
def batch_sharded_activations(sharding_for_ndim: Callable[[int], Any]):
    """While a step is traced inside this context, every scanned layer pins its carry (the
    residual stream, batch first) to `sharding_for_ndim(ndim)`. The trainer sets it so that
    GSPMD keeps activations split over the batch axes and gathers each layer's FSDP-sharded
    weights; left alone it may split activations along `embed` like the weights and run the whole
    batch on every device. Outside the context (inference, most tests) nothing changes."""
    token = _BATCH_SHARDING.set(sharding_for_ndim)
    try:
        yield
    finally:
        _BATCH_SHARDING.reset(token)


def _carry_batch_sharded(fn: Callable) -> Callable:
    get = _BATCH_SHARDING.get()
    if get is None:
        return fn

    def pin(x):
        return jax.lax.with_sharding_constraint(x, get(x.ndim))

    def wrapped(carry, xs):
        y, out = fn(pin(carry), xs)
        return pin(y), out

    return wrapped


# ---------------------------------------------------------------- norms
def layer_norm(x, scale, bias, eps: float):
    """LayerNorm computed in fp32 (as torch does for fp32; stable for bf16)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rms_norm(x, scale, eps: float):
    """LLaMA RMSNorm: normalise in fp32, cast back, then multiply by the weight (HF order)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)
    return y.astype(x.dtype) * scale.astype(x.dtype)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x):
    """transformers' `gelu_pytorch_tanh` (SigLIP): the tanh approximation of GELU."""
    return jax.nn.gelu(x, approximate=True)


# The vision towers' `hidden_act` values (transformers' names) and their functions.
ACTIVATIONS: dict[str, Callable] = {"quick_gelu": quick_gelu, "gelu": gelu_exact, "gelu_pytorch_tanh": gelu_tanh}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ---------------------------------------------------------------- rotary
def rope_inv_freq(head_dim: int, rope) -> np.ndarray:
    """Inverse frequencies (float32 numpy) for `RopeConfig` types default / linear / llama3."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    if rope.type == "linear":
        inv = inv / rope.factor
    elif rope.type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_cos_sin(positions, inv_freq: np.ndarray, dtype):
    """positions [B, L] -> cos, sin [B, L, head_dim] (rotate-half layout), computed in fp32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
    """x [B, L, H, D]; cos/sin [B, L, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ---------------------------------------------------------------- attention
def attention_mask(q_index, k_index, q_segment, k_segment, causal: bool, window: int | None = None):
    """Boolean [B, Lq, Lk]: same non-zero segment, (if causal) key index <= query index, and (with
    a sliding `window`) query index - key index < window.

    Indices are slot indices in the (cached) sequence, not RoPE positions, so packed rows and
    left-padded decoding share one rule. Segment 0 marks padding / empty cache slots. A segment
    fills consecutive slots, so within it slot distance = token distance: the window counts the
    tokens of the query's own sample, as transformers' `q - k < sliding_window` does.
    """
    mask = (q_segment[:, :, None] == k_segment[:, None, :]) & (k_segment[:, None, :] != 0)
    if causal:
        mask &= k_index[..., None, :] <= q_index[..., :, None]
    if window is not None:
        mask &= q_index[..., :, None] - k_index[..., None, :] < window
    return mask


# Implementations (RuntimeOptions.attention_impl). All take the same inputs and give the same
# outputs at every position a valid token reads (tests/test_perf_levers.py):
#   xla           einsum + materialised [B, Lq, Lk] mask, fp32 scores/softmax (the reference);
#   dpa, cudnn    jax.nn.dot_product_attention(implementation=None | "cudnn"): is_causal plus the
#                 same-segment mask passed as `mask` (cuDNN turns it into an additive bias), so
#                 packed rows are exact; `dpa` is the XLA fallback of the very same call (CPU tests);
#   dpa_padded,   the same call with is_causal and per-row `query_seq_lengths`/`key_value_seq_lengths`
#   cudnn_padded  and no mask: cuDNN's fastest path, but only for rows holding ONE right-padded
#                 segment each (unpacked data, the benchmark); packed rows would attend across samples;
#   pallas        the Pallas flash-attention kernel (jax.experimental.pallas.ops.gpu.attention, Triton)
#                 that takes segment ids natively: packed rows exact, no mask in memory. Runs in
#                 interpret mode off GPU (slow; for tests). GQA by repeating K/V heads.
#   splash        the TPU splash-attention kernel (jax.experimental.pallas.ops.tpu.splash_attention):
#                 segment ids, causal / sliding-window masks whose empty blocks it skips, GQA
#                 natively, no [L, L] array in HBM. Inside a sharded train step it runs per device
#                 under shard_map (batch over the batch axes, heads over `tensor` when it divides
#                 them): the kernel is a custom call GSPMD cannot split. Interpret mode on CPU
#                 (tests); on GPU an error (use cudnn / pallas there).
# The fused impls apply to self-attention without a KV cache (training, the vision tower); cached
# decoding always takes the `xla` path with its mask.
# Sliding windows (Mistral): dpa / cudnn pass `local_window_size=(window - 1, 0)` (cuDNN's causal
# sliding window of `window` keys); the Pallas kernel has no window, so `pallas` with a window
# takes the `xla` path on the mask (which holds the window); splash's LocalMask holds the window.
ATTENTION_IMPLS = ("xla", "dpa", "cudnn", "dpa_padded", "cudnn_padded", "pallas", "splash")
# Pallas interpret mode: None = interpret unless the default backend is a GPU (tests set False to
# lower the real Triton kernel for CUDA on a CPU-only machine).
PALLAS_INTERPRET: bool | None = None


def dot_product_attention(q, k, v, mask, impl: str = "xla", *, segment_ids=None, causal: bool = False,
                          window: int | None = None):
    """q [B, Lq, H, D], k/v [B, Lk, KV, D] (GQA: H = KV * G); output [B, Lq, H, D] in q's dtype.

    `mask` [B, Lq, Lk] bool (None = every key visible) is what the `xla` path applies. Callers of
    self-attention without a cache may also pass `segment_ids` [B, L] (0 = padding), `causal` and
    a sliding `window`: their mask must then equal `attention_mask(i, i, seg, seg, causal, window)`;
    the fused impls use the segment ids and window instead of the mask. Without segment ids, a
    given mask means cached decoding and takes the `xla` path; `mask=None` (the vision tower) runs
    every impl unmasked.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; known: {', '.join(ATTENTION_IMPLS)}")
    if impl == "xla" or (segment_ids is None and mask is not None):  # reference / cached decoding
        return _attention_xla(q, k, v, mask)
    if impl == "pallas":
        if window is not None:  # the Pallas kernel has no sliding window: the mask holds it
            return _attention_xla(q, k, v, mask)
        return _attention_pallas(q, k, v, segment_ids, causal)
    if impl == "splash":
        return _attention_splash(q, k, v, segment_ids, causal, window)
    backend, _, variant = impl.partition("_")
    implementation = "cudnn" if backend == "cudnn" else None
    scale = 1.0 / math.sqrt(q.shape[-1])
    if segment_ids is None:  # no mask at all (the vision tower)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    # (left, right) keys around the query: `window - 1` before it and itself, as `q - k < window`
    local = None if window is None else (window - 1, 0)
    if variant == "padded":
        n = (segment_ids != 0).sum(-1).astype(jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, query_seq_lengths=n,
                                            key_value_seq_lengths=n, local_window_size=local,
                                            implementation=implementation)
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
    return jax.nn.dot_product_attention(q, k, v, mask=same[:, None], scale=scale, is_causal=causal,
                                        local_window_size=local, implementation=implementation)


def _attention_xla(q, k, v, mask):
    """Scores and softmax in fp32; output in q's dtype."""
    b, lq, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qg = q.reshape(b, lq, kvh, g, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(d))
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, lq, h, d)


def _padded_with_segments(q, k, v, segment_ids, length: int):
    """q, k, v [B, L, *, D] padded along L to `length` and int32 segment ids [B, length] (all 1
    when None): the padding is segment 0, which no real query attends to."""
    b, l = q.shape[:2]
    seg = jnp.ones((b, l), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if length != l:
        pad = ((0, 0), (0, length - l), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        seg = jnp.pad(seg, ((0, 0), (0, length - l)))
    return q, k, v, seg


def _attention_pallas(q, k, v, segment_ids, causal: bool):
    """Pallas flash attention with segment ids. The sequence is padded to the kernel's block
    multiple with segment 0 (real queries never see those keys; their own outputs are dropped)."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    b, l, h, d = q.shape
    g = h // k.shape[2]
    if g > 1:  # the kernel is multi-head only: share each K/V head with its G query heads
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    lp = -(-l // 128) * 128 if l > 128 else max(16, 1 << (l - 1).bit_length())
    q, k, v, seg = _padded_with_segments(q, k, v, segment_ids, lp)
    blk = min(128, lp)
    small = min(32, lp)
    sizes = pallas_attention.BlockSizes(block_q=blk, block_k=blk, block_q_dkv=small, block_kv_dkv=small,
                                        block_q_dq=small, block_kv_dq=small)
    out = pallas_attention.mha(q, k, v, seg, sm_scale=1.0 / math.sqrt(d), causal=causal, block_sizes=sizes,
                               interpret=jax.default_backend() != "gpu" if PALLAS_INTERPRET is None
                               else PALLAS_INTERPRET)
    return out[:, :l]


# Splash block sizes: the largest of these that divides the (padded) length. Bigger blocks keep
# the MXU busier; 512 is what MaxText runs its splash kernel with at 2048+ tokens.
SPLASH_BLOCKS = (512, 256, 128)
# The mesh axis the heads are split over (sharding.LOGICAL_RULES["heads"]).
HEADS_MESH_AXIS = "tensor"


def _attention_splash(q, k, v, segment_ids, causal: bool, window: int | None):
    """The TPU splash kernel on [B, L, H, D] inputs. The length is padded to a multiple of 128
    with segment 0, which no real query attends to; padded outputs are dropped."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    b, l, h, d = q.shape
    kvh = k.shape[2]
    lp = -(-l // 128) * 128
    q, k, v, seg = _padded_with_segments(q, k, v, segment_ids, lp)
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)  # the kernel does not scale the scores

    get_sharding = _BATCH_SHARDING.get()
    sharding = None if get_sharding is None else get_sharding(4)
    heads_axis = None
    if sharding is not None:
        mesh = sharding.mesh
        t = mesh.shape.get(HEADS_MESH_AXIS, 1)
        heads_axis = HEADS_MESH_AXIS if t > 1 and h % t == 0 and kvh % t == 0 else None
        local_h = h // (mesh.shape[heads_axis] if heads_axis else 1)
        platform = mesh.devices.flat[0].platform
    else:
        local_h, platform = h, jax.default_backend()
    if platform not in ("tpu", "cpu"):  # interpret mode is for CPU tests, far too slow to train with
        raise ValueError(f"attention_impl='splash' is a TPU kernel; on {platform} use cudnn, cudnn_padded or pallas")
    kernel = _splash_kernel(local_h, lp, causal, window, platform == "cpu")

    def per_device(q, k, v, seg):  # [b', L, h', D] -> kernel layout [h', L, D] per row
        one = lambda q, k, v, s: kernel(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
                                        segment_ids=splash.SegmentIds(s, s)).swapaxes(0, 1)
        return jax.vmap(one)(q, k, v, seg)

    if sharding is not None:
        batch = sharding.spec[0] if len(sharding.spec) else None
        qkv, rows = jax.sharding.PartitionSpec(batch, None, heads_axis, None), jax.sharding.PartitionSpec(batch, None)
        per_device = jax.shard_map(per_device, mesh=sharding.mesh, in_specs=(qkv, qkv, qkv, rows),
                                   out_specs=qkv, check_vma=False)
    return per_device(q, k, v, seg)[:, :l]


# (heads, length, causal, window, interpret) -> the kernel built for it (see `_splash_kernel`).
_SPLASH_KERNELS: dict[tuple, Any] = {}


def _splash_kernel(heads: int, length: int, causal: bool, window: int | None, interpret: bool):
    """A splash kernel for `heads` query heads over `length` (a multiple of 128) tokens. Its
    block-sparsity tables are built here, on the host, once per shape (they are constants of the
    compiled step)."""
    key = (heads, length, causal, window, interpret)
    if key not in _SPLASH_KERNELS:
        _SPLASH_KERNELS[key] = _build_splash_kernel(*key)
    return _SPLASH_KERNELS[key]


def splash_visited_fraction(heads: int, length: int) -> float:
    """The fraction of the [length, length] score blocks that the causal (or sliding-window)
    splash kernels built so far for `heads` heads visit (their mask leaves the others empty, and
    the kernels skip them; an unmasked kernel visits all). The TPU compiler estimate costs the
    kernels with it (tools/aot_compile.py): XLA cannot look inside them."""
    blocks = length // _splash_block(length)
    fractions = set()
    for (h, n, causal, window, _), kernel in _SPLASH_KERNELS.items():
        if (h, n) == (heads, length) and (causal or window is not None):
            block_mask = np.asarray(kernel.fwd_mask_info.block_mask)  # [unique heads, q blocks, <= kv blocks]
            fractions.add(float((block_mask != 0).sum() / (block_mask.shape[0] * blocks * blocks)))
    if len(fractions) != 1:
        raise ValueError(f"{len(fractions)} masked splash kernels for {heads} heads x {length} tokens: cannot tell "
                         f"which one a kernel call runs ({sorted(fractions)})")
    return fractions.pop()


def _build_splash_kernel(heads: int, length: int, causal: bool, window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (length, length)
    if window is not None:  # `window - 1` keys before the query and itself (causal by construction)
        mask = masks.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    else:
        mask = masks.CausalMask(shape) if causal else masks.FullMask(shape)
    blk = _splash_block(length)
    sizes = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                              block_kv_dkv_compute=blk, use_fused_bwd_kernel=True)
    with jax.ensure_compile_time_eval():  # concrete tables: the cache outlives any one trace
        return splash.make_splash_mha(masks.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)


def _splash_block(length: int) -> int:
    return next(bs for bs in SPLASH_BLOCKS if length % bs == 0)
