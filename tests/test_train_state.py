"""Freezing, optimizer state, schedule, accumulation, loss normalisation, sharded == 1 device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.models.llava import loss_fn_from_logits
from llava_jax import sharding as shd
from llava_jax.train_step import batch_loss, lr_schedule, split_model
from train_util import devices, params_by_path, run_steps, synthetic_batch, tiny_model


def test_stage1_trains_only_projector_and_holds_only_its_moments():
    model = tiny_model()
    before = params_by_path(nnx.state(model, nnx.Param))
    cfg = model.config
    trainable, frozen, opt_state, _ = run_steps(model, [r"projector/.*"], synthetic_batch(cfg))
    after = {**params_by_path(trainable), **params_by_path(frozen)}
    for path, old in before.items():
        if path.startswith("projector/"):
            assert not np.array_equal(after[path], old), path
        else:
            np.testing.assert_array_equal(after[path], old, err_msg=path)
    # Optimizer state: Adam moments only for the projector's 4 arrays (mu and nu).
    moment_shapes = sorted(x.shape for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    proj_shapes = sorted(v.shape for k, v in before.items() if k.startswith("projector/"))
    assert moment_shapes == sorted(proj_shapes * 2)
    n_state = sum(x.size for x in jax.tree.leaves(opt_state))
    n_proj = sum(v.size for k, v in before.items() if k.startswith("projector/"))
    assert n_state <= 2 * n_proj + 8  # + scalar counters


def test_stage2_leaves_vision_tower_bitwise_equal():
    model = tiny_model()
    before = params_by_path(nnx.state(model, nnx.Param))
    trainable, frozen, _, _ = run_steps(model, [r"projector/.*", r"llm/.*"], synthetic_batch(model.config))
    after = {**params_by_path(trainable), **params_by_path(frozen)}
    for path, old in before.items():
        if path.startswith("vision/"):
            np.testing.assert_array_equal(after[path], old, err_msg=path)
    assert not np.array_equal(after["llm/layers/q_kernel"], before["llm/layers/q_kernel"])


def test_frozen_params_get_no_gradient_work():
    """The gradient is taken w.r.t. trainable params only; frozen ones are stop_gradient'ed."""
    model = tiny_model()
    graphdef, trainable, frozen = split_model(model, [r"projector/.*"])
    batch = synthetic_batch(model.config)
    g = jax.grad(lambda t: batch_loss(t, frozen, graphdef, batch)[0])(trainable)
    assert set(params_by_path(g)) == {p for p in params_by_path(trainable)}
    # d loss / d frozen through stop_gradient is exactly zero.
    gf = jax.grad(lambda f: batch_loss(trainable, f, graphdef, batch)[0])(frozen)
    assert all(not np.any(v) for v in params_by_path(gf).values())


def test_loss_is_mean_over_all_supervised_tokens():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
    targets = jnp.array([[1, -100, 4], [-100, -100, 2]])
    s, n = loss_fn_from_logits(logits, targets)
    lp = jax.nn.log_softmax(logits, -1)
    hand = -(lp[0, 0, 1] + lp[0, 2, 4] + lp[1, 2, 2]) / 3  # three tokens, not mean of row means
    assert int(n) == 3
    assert abs(float(s / n) - float(hand)) < 1e-6


def test_accumulation_equals_one_big_batch():
    batch = synthetic_batch(tiny_model().config, batch=8)
    t1, _, _, l1 = run_steps(tiny_model(), [r"projector/.*", r"llm/.*"], batch, steps=2, accum=1)
    t4, _, _, l4 = run_steps(tiny_model(), [r"projector/.*", r"llm/.*"], batch, steps=2, accum=4)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    a, b = params_by_path(t1), params_by_path(t4)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


def test_schedule_matches_hf_cosine_with_warmup():
    torch = pytest.importorskip("torch")
    from transformers import get_cosine_schedule_with_warmup

    total, lr = 100, 2e-5
    sched = lr_schedule(lr, total, warmup_ratio=0.03)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    hf = get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=total)
    for step in range(total):
        assert abs(float(sched(step)) - opt.param_groups[0]["lr"]) < 1e-12 + 1e-6 * lr, step
        opt.step()
        hf.step()


def test_no_weight_decay_on_norms_and_biases():
    model = tiny_model()
    _, trainable, _ = split_model(model, [r".*"])
    from llava_jax.train_step import decay_mask, path_str

    mask = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(decay_mask(trainable))[0]}
    assert len(mask) == len(jax.tree.leaves(trainable))
    decayed = {k for k, v in mask.items() if v}
    assert decayed == {k for k in mask if k.endswith("_kernel") or k in (
        "llm/embed", "llm/lm_head", "vision/patch_embed", "vision/class_embed", "vision/pos_embed")}
    assert {"projector/linear_1_bias", "llm/final_norm", "vision/layers/ln1_scale",
            "vision/layers/q_bias"} <= set(mask) - decayed


@pytest.mark.parametrize("shape", [(2, 2, 2), pytest.param((1, 4, 2), marks=pytest.mark.slow),
                                   pytest.param((8, 1, 1), marks=pytest.mark.slow),
                                   pytest.param((2, 1, 4), marks=pytest.mark.slow)])
def test_sharded_step_equals_single_device(shape):
    devs = devices(8)
    batch = synthetic_batch(tiny_model().config, batch=8)
    one = shd.make_mesh((1, 1, 1), devices=devs[:1])
    many = shd.make_mesh(shape, devices=devs)
    pat = [r"projector/.*", r"llm/.*"]
    t1, _, _, l1 = run_steps(tiny_model(), pat, batch, mesh=one)
    t8, f8, _, l8 = run_steps(tiny_model(), pat, batch, mesh=many)
    np.testing.assert_allclose(l1, l8, rtol=1e-5, atol=1e-6)
    a, b = params_by_path(t1), params_by_path(t8)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    # Really sharded: the big matrices are split over devices.
    q = nnx.to_flat_state(t8)
    q = {"/".join(map(str, p)): v.value for p, v in q}["llm/layers/q_kernel"]
    assert len(q.sharding.device_set) == 8
    assert q.addressable_shards[0].data.size < q.size or shape == (8, 1, 1)
    if shape[1] * shape[2] > 1:
        assert q.addressable_shards[0].data.size < q.size


def test_mesh_shape_resolution():
    assert shd.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="does not divide"):
        shd.resolve_mesh_shape((-1, 3, 1), 8)
    with pytest.raises(ValueError, match="at most one"):
        shd.resolve_mesh_shape((-1, -1, 1), 8)
