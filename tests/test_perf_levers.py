"""Performance levers (issue 9) equal the reference path on CPU: attention implementations,
chunked cross-entropy, bf16 frozen params. Each lever is off by default."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.models.layers import attention_mask, dot_product_attention
from llava_jax.models.llava import LlavaModel, chunked_loss_fn, loss_fn_from_logits
from llava_jax.train_step import batch_loss, cast_frozen, split_model
from llava_jax.train.defaults import base_config
from train_util import synthetic_batch, tiny_model_config

# Packed rows: two samples then padding; one sample filling the row; one sample then padding.
SEGMENTS = np.array([[1] * 7 + [2] * 6 + [0] * 3, [1] * 16, [1] * 11 + [0] * 5], np.int32)
UNPACKED = np.array([[1] * 13 + [0] * 3, [1] * 16, [1] * 11 + [0] * 5], np.int32)


def _qkv(b=3, l=16, h=4, kv=2, d=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (b, l, h, d)), jax.random.normal(ks[1], (b, l, kv, d)),
            jax.random.normal(ks[2], (b, l, kv, d)), jax.random.normal(ks[3], (b, l, h, d)))


def _attn_and_grads(impl, seg, q, k, v, r):
    seg = jnp.asarray(seg)
    slots = jnp.arange(seg.shape[1])
    mask = attention_mask(slots, slots, seg, seg, causal=True)
    valid = (seg != 0)[:, :, None, None]

    def f(q, k, v):
        out = dot_product_attention(q, k, v, mask, impl, segment_ids=seg, causal=True)
        return jnp.sum(jnp.where(valid, out * r, 0.0)), out

    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return np.where(valid, out, 0.0), grads


@pytest.mark.parametrize("impl,seg", [("dpa", SEGMENTS), ("pallas", SEGMENTS), ("dpa_padded", UNPACKED),
                                      ("dpa", UNPACKED), ("splash", SEGMENTS)])
def test_attention_impl_equals_xla(impl, seg):
    """Outputs at valid positions and gradients w.r.t. q, k, v (GQA, packed segments, padding)."""
    q, k, v, r = _qkv()
    ref_out, ref_grads = _attn_and_grads("xla", seg, q, k, v, r)
    out, grads = _attn_and_grads(impl, seg, q, k, v, r)
    np.testing.assert_allclose(out, ref_out, atol=2e-5)
    for g, rg in zip(grads, ref_grads):
        np.testing.assert_allclose(g, rg, atol=2e-5)


def test_padded_impl_is_wrong_for_packed_rows():
    """`*_padded` declares one segment per row: on packed rows it differs (documented limit)."""
    q, k, v, r = _qkv()
    ref_out, _ = _attn_and_grads("xla", SEGMENTS, q, k, v, r)
    out, _ = _attn_and_grads("dpa_padded", SEGMENTS, q, k, v, r)
    assert np.abs(out - ref_out).max() > 1e-2


def test_unmasked_attention_equals_xla():
    """The vision tower's call (no mask, no segments), on a length the Pallas kernel must pad."""
    q, k, v, _ = _qkv(l=13, h=2, kv=2)
    ref = dot_product_attention(q, k, v, None, "xla")
    for impl in ("dpa", "pallas", "splash"):
        np.testing.assert_allclose(dot_product_attention(q, k, v, None, impl), ref, atol=2e-5)


def test_unknown_impl_names_the_choices():
    q, k, v, _ = _qkv()
    with pytest.raises(ValueError, match="known: xla, dpa, cudnn"):
        dot_product_attention(q, k, v, None, "flash")


def _packed_batch(cfg):
    """Rows of two samples each (segments 1, 2; positions restart), images in the first."""
    b = synthetic_batch(cfg, batch=4, length=16, seed=3)
    seg = b["segment_ids"].copy()
    pos = b["positions"].copy()
    seg[:, 9:][seg[:, 9:] != 0] = 2
    pos[:, 9:] = np.arange(7)[None]
    b["targets"][:, 8] = -100  # no target across the sample boundary
    b["segment_ids"], b["positions"] = seg, pos
    return b


def _loss_and_grads(cfg, batch, trainable_patterns=(r"projector/.*", r"llm/.*"), frozen_dtype=None, seed=0,
                    loss_chunk=0):
    model = LlavaModel(cfg, rngs=nnx.Rngs(seed))
    graphdef, trainable, frozen = split_model(model, list(trainable_patterns))
    if frozen_dtype is not None:
        frozen = cast_frozen(frozen, frozen_dtype)
    jb = jax.tree.map(jnp.asarray, batch)
    (s, n), g = jax.jit(jax.value_and_grad(batch_loss, has_aux=True), static_argnums=(2, 4))(
        trainable, frozen, graphdef, jb, loss_chunk)
    return float(s), int(n), {"/".join(map(str, p)): np.asarray(v.value) for p, v in nnx.to_flat_state(g)}


def _assert_same(a, b, rtol, atol):
    assert a[1] == b[1]
    np.testing.assert_allclose(a[0], b[0], rtol=rtol)
    assert a[2].keys() == b[2].keys()
    for key in a[2]:
        np.testing.assert_allclose(a[2][key], b[2][key], rtol=rtol, atol=atol, err_msg=key)


@pytest.fixture(scope="module")
def reference():
    """fp32 stage-2 loss and every gradient with the default levers (xla attention, full logits)."""
    cfg = tiny_model_config()
    batch = _packed_batch(cfg)
    return cfg, batch, _loss_and_grads(cfg, batch)


# CI runs two combinations covering every lever's wiring through the model; the full matrix is slow.
@pytest.mark.parametrize("impl,chunk,remat", [
    ("pallas", 0, "none"), ("dpa", 5, "dots_attn"), ("splash", 0, "full"),
    pytest.param("dpa", 0, "none", marks=pytest.mark.slow), pytest.param("xla", 4, "none", marks=pytest.mark.slow),
    pytest.param("xla", 16, "dots", marks=pytest.mark.slow),
    pytest.param("pallas", 5, "dots_attn", marks=pytest.mark.slow),
])
def test_model_loss_and_grads_equal_with_levers(reference, impl, chunk, remat):
    """Whole train loss (vision tower + packed LLM rows) and every gradient, fp32, with another
    attention impl and/or the vocab loss chunked (5 does not divide 16: padded tail) and/or a
    remat policy."""
    cfg, batch, ref = reference
    out = _loss_and_grads(cfg.with_runtime(attention_impl=impl, remat_policy=remat), batch, loss_chunk=chunk)
    _assert_same(out, ref, rtol=1e-4, atol=1e-6)


def test_chunked_loss_never_builds_full_logits():
    """No [B, L, V] array anywhere in the forward+backward jaxpr; the unchunked one has them."""
    b, l, d, v, chunk = 2, 12, 8, 40, 4
    h = jax.random.normal(jax.random.key(0), (b, l, d))
    w = jax.random.normal(jax.random.key(1), (d, v))
    t = jax.random.randint(jax.random.key(2), (b, l), 0, v)

    def shapes(fn):
        jaxpr = jax.make_jaxpr(jax.grad(lambda h, w: fn(h, w)[0], argnums=(0, 1)))(h, w)
        out = set()

        def walk(jp):
            for eqn in jp.eqns:
                out.update(tuple(x.aval.shape) for x in eqn.outvars)
                for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
                    walk(sub)
                for p in eqn.params.values():
                    inner = getattr(p, "jaxpr", None)
                    if inner is not None:
                        walk(getattr(inner, "jaxpr", inner))
        walk(jaxpr.jaxpr)
        return out

    full = shapes(lambda h, w: loss_fn_from_logits(h @ w, t))
    chunked = shapes(lambda h, w: chunked_loss_fn(h, t, lambda x: x @ w, chunk))
    assert (b, l, v) in full
    assert (b, l, v) not in chunked and (b, chunk, v) in chunked
    np.testing.assert_allclose(chunked_loss_fn(h, t, lambda x: x @ w, chunk)[0],
                               loss_fn_from_logits(h @ w, t)[0], rtol=1e-6)


@pytest.mark.parametrize("stage", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_bf16_frozen_params_change_nothing(stage):
    """bf16 compute: frozen params stored in bf16 give the same loss and gradients as fp32 ones."""
    cfg = tiny_model_config().with_runtime(dtype=jnp.bfloat16)
    batch = _packed_batch(cfg)
    pats = (r"projector/.*",) if stage == 1 else (r"projector/.*", r"llm/.*")
    ref = _loss_and_grads(cfg, batch, pats)
    out = _loss_and_grads(cfg, batch, pats, frozen_dtype=jnp.bfloat16)
    _assert_same(out, ref, rtol=0, atol=0)


def test_cast_frozen_keeps_norms_and_position_embeddings():
    model = LlavaModel(tiny_model_config(), rngs=nnx.Rngs(0))
    _, _, frozen = split_model(model, [r"projector/.*"])
    dt = {"/".join(map(str, p)): v.value.dtype for p, v in nnx.to_flat_state(cast_frozen(frozen, jnp.bfloat16))}
    assert dt["vision/layers/ln1_scale"] == jnp.float32 and dt["vision/pos_embed"] == jnp.float32
    assert dt["llm/final_norm"] == jnp.float32
    assert dt["vision/layers/q_kernel"] == jnp.bfloat16 and dt["llm/embed"] == jnp.bfloat16


def test_trainer_config_turns_the_memory_levers_on(monkeypatch):
    """`model.loss_chunk` reaches the train step the trainer compiles, `model.cast_frozen` the
    frozen params its step holds (concrete, and abstract with shardings for tools/aot.py's
    will-it-fit)."""
    from llava_jax import build
    from llava_jax import sharding as shd
    from llava_jax.data.tokenize import LlavaTokenIds
    from llava_jax import train_step as state
    from llava_jax.train_step import make_optimizer

    build_model, frozen_for_training = build.model, build.frozen_for_training

    c = base_config()
    c.model.init = "scratch"
    c.model.dtype = "bfloat16"
    c.model.loss_chunk = 8
    c.model.cast_frozen = True
    c.model.scratch.text.update(hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4)
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = build_model(c, mesh, tokenizer_ids=LlavaTokenIds(image_token_id=60, pad_token_id=None), vocab_size=64)
    graphdef, trainable, frozen = split_model(model, [r"projector/.*"])
    seen = {}
    make = state.make_train_step
    monkeypatch.setattr(state, "make_train_step", lambda *a, **k: seen.update(k) or make(*a, **k))
    tx, schedule = make_optimizer(c.optim, 10, trainable)
    build.compiled_train_step(c, mesh, graphdef, tx, schedule, trainable, tx.init(trainable), frozen)
    assert seen["loss_chunk"] == 8
    dt = {"/".join(map(str, p)): v.value.dtype for p, v in nnx.to_flat_state(frozen_for_training(frozen, c))}
    assert dt["vision/layers/q_kernel"] == jnp.bfloat16 and dt["llm/embed"] == jnp.bfloat16
    assert dt["vision/pos_embed"] == jnp.float32 and dt["llm/final_norm"] == jnp.float32
    assert all(v.value.dtype == jnp.float32 for _, v in nnx.to_flat_state(trainable))  # fp32 master params
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), frozen)
    cast = {"/".join(map(str, p)): v.value for p, v in nnx.to_flat_state(frozen_for_training(abstract, c))}
    assert cast["llm/embed"].dtype == jnp.bfloat16 and cast["llm/embed"].sharding is not None
    c.model.cast_frozen = False
    assert frozen_for_training(frozen, c) is frozen


def test_runtime_options_reach_a_model_loaded_from_hf(tmp_path):
    """The HF-loading path (`from_pretrained` with the run's mesh) takes the model fields."""
    pytest.importorskip("torch")
    from hf_util import CONFIGS, make_hf_llava
    from llava_jax import build
    from llava_jax import sharding as shd

    make_hf_llava(next(iter(CONFIGS))).save_pretrained(tmp_path)
    c = base_config()
    c.model.init, c.model.hf_path, c.model.remat, c.model.dtype = "hf", str(tmp_path), "dots", "float32"
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    assert build.model(c, mesh).config.runtime.remat_policy == "dots"


def _lower_train_grad_for_cuda(geo_cfg, batch, loss_chunk=0):
    """StableHLO of the stage-2 loss gradient lowered for CUDA (no GPU needed, nothing compiled)."""
    model = nnx.eval_shape(lambda: LlavaModel(geo_cfg, rngs=nnx.Rngs(0)))
    g, tr, fr = split_model(model, [r"projector/.*", r"llm/.*"])
    fn = jax.jit(jax.grad(lambda tr, fr, bt: batch_loss(tr, fr, g, bt, loss_chunk)[0]))
    return fn.trace(tr, fr, batch).lower(lowering_platforms=("cuda",)).as_text()


@pytest.fixture
def fake_cudnn(monkeypatch):
    """Let jax lower its cuDNN attention for an H100 on a machine without CUDA (private API:
    skipped if jax moved it)."""
    fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    for name in ("check_cudnn_version", "check_compute_capability", "is_cuda_compute_capability_equal"):
        if not hasattr(fa, name):
            pytest.skip(f"jax moved {name}")
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda cap: True)
    monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda cap: cap == "9.0")


@pytest.mark.parametrize("impl", ["cudnn", "cudnn_padded", "pallas"])
def test_fused_attention_lowers_for_cuda(impl, fake_cudnn, monkeypatch):
    """The GPU kernels themselves cannot run here; their lowering for CUDA can: the train step's
    gradient holds the cuDNN flash-attention forward+backward custom calls (the frozen vision tower
    forward only), or the Pallas Triton kernels."""
    from llava_jax.models import layers

    monkeypatch.setattr(layers, "PALLAS_INTERPRET", False)
    cfg = tiny_model_config().with_runtime(dtype=jnp.bfloat16, attention_impl=impl, remat_policy="dots")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, head_dim=8))  # cuDNN: head_dim % 8 == 0
    txt = _lower_train_grad_for_cuda(cfg, jax.tree.map(jnp.asarray, _packed_batch(cfg)), loss_chunk=8)
    calls = set(re.findall(r"custom_call @([\w.$-]+)", txt))
    if impl == "pallas":
        assert "__gpu$xla.gpu.triton" in calls and "mha_forward" in txt and "mha_backward" in txt
    else:
        llm = "__cudnn$fmhaScaleBiasSoftmax" if impl == "cudnn" else "__cudnn$fmhaSoftmax"
        assert {llm, llm + "Backward", "__cudnn$fmhaSoftmax"} <= calls, calls  # vision: unmasked forward
        assert {c for c in calls if c.endswith("Backward")} == {llm + "Backward"}  # no vision backward


@pytest.mark.parametrize("impl", ["cudnn_padded", "pallas"])
def test_dots_attn_remat_runs_the_attention_forward_once(impl, fake_cudnn, monkeypatch):
    """Under `dots` the backward reruns the fused attention forward (vision fwd + LLM fwd + LLM
    fwd again = 3 kernels in the lowered step); `dots_attn` saves its outputs and residuals (2)."""
    from llava_jax.models import layers

    monkeypatch.setattr(layers, "PALLAS_INTERPRET", False)
    counts = {}
    for remat in ("dots", "dots_attn"):
        cfg = tiny_model_config().with_runtime(dtype=jnp.bfloat16, attention_impl=impl, remat_policy=remat)
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, head_dim=8))
        txt = _lower_train_grad_for_cuda(cfg, jax.tree.map(jnp.asarray, _packed_batch(cfg)))
        calls = re.findall(r"custom_call @([\w.$-]+)", txt)
        counts[remat] = calls.count("__cudnn$fmhaSoftmax") if impl != "pallas" else txt.count('"mha_forward"')
    assert counts == {"dots": 3, "dots_attn": 2}


def test_save_qkv_out_remat_saves_the_named_activations(capsys):
    """`save_qkv_out` keeps q/k/v, the attention output and the MLP output of every scanned layer
    for the backward pass (it used to name tags no layer set, so it saved nothing, like `full`)."""
    from jax.ad_checkpoint import print_saved_residuals

    saved = {}
    for policy in ("save_qkv_out", "full"):
        cfg = tiny_model_config().with_runtime(remat_policy=policy)
        graphdef, state = nnx.split(LlavaModel(cfg, rngs=nnx.Rngs(0)).llm)
        t, L = 8, cfg.text.num_layers
        x = jnp.ones((1, t, cfg.text.hidden_size))

        def f(state, x):
            out = nnx.merge(graphdef, state)(x, jnp.arange(t)[None], jnp.ones((1, t), jnp.int32), return_hidden=True)
            return (out[0] if isinstance(out, tuple) else out).sum()

        print_saved_residuals(f, state, x)
        # per-layer residuals come out of the scan stacked on a leading layers axis
        saved[policy] = re.findall(rf"f32\[{L},1,{t},([\d,]+)\] output of scan", capsys.readouterr().out)
    from collections import Counter

    h, kv, d = cfg.text.num_heads, cfg.text.num_kv_heads, cfg.text.head_dim
    extra = Counter(saved["save_qkv_out"]) - Counter(saved["full"])  # `full` keeps only each layer's input
    assert extra[f"{h},{d}"] == 2 and extra[f"{kv},{d}"] == 2, saved  # q + attention output, k + v
