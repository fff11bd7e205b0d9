"""FSDP placement that the TPU AOT compile exposed at 7B: the optimizer moments take their params'
shardings (left to XLA they were placed on one device, then replicated: 8 bytes per param on
every chip), and each layer's activations stay split over the batch axes (left to GSPMD they
were split along `embed` like the weights, and every device ran the whole batch)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models.llava import LlavaModel
from llava_jax import build
from llava_jax import sharding as shd
from llava_jax.train_step import make_optimizer, make_train_step, opt_state_shardings, split_model
from train_util import devices, optim_config, synthetic_batch, tiny_model_config


def sharded_model(mesh, cfg):
    abs_model = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abs_model)
    state = jax.jit(lambda: nnx.split(LlavaModel(cfg, rngs=nnx.Rngs(0)))[1],
                    out_shardings=shd.state_shardings(abs_state, mesh))()
    return nnx.merge(graphdef, state)


def test_moments_take_the_param_shardings():
    mesh = shd.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, devices(8))
    graphdef, trainable, frozen = split_model(sharded_model(mesh, tiny_model_config()), [r"llm/.*"])
    tx, _ = make_optimizer(optim_config(), 10, trainable)
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, trainable, mesh))(trainable)
    params = {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(trainable)}
    seen = 0
    for path, x in jax.tree_util.tree_leaves_with_path(opt_state):
        key = jax.tree_util.keystr(path)
        if ".mu" in key or ".nu" in key:
            suffix = key.split(".mu" if ".mu" in key else ".nu", 1)[1]
            assert x.sharding.spec == params[suffix], key
            seen += 1
        else:
            assert x.sharding.spec == jax.sharding.PartitionSpec(), key  # counts: replicated
    assert seen == 2 * len(params)
    assert params["['llm']['embed'].value"] == jax.sharding.PartitionSpec(None, "fsdp")


def test_activations_stay_split_over_the_batch():
    mesh = shd.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, devices(8))
    cfg = tiny_model_config()
    graphdef, trainable, frozen = split_model(sharded_model(mesh, cfg), [r"projector/.*", r"llm/.*"])
    tx, schedule = make_optimizer(optim_config(), 10, trainable)
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, trainable, mesh))(trainable)
    batch = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim))
             for k, v in synthetic_batch(cfg, batch=8, length=64).items()}
    step = make_train_step(graphdef, tx, schedule)
    args = (trainable, opt_state, frozen, batch, jnp.asarray(0, jnp.int32))

    pinned = jax.jit(build.with_batch_sharded_activations(step, mesh)).lower(*args).compile()
    free = jax.jit(step).lower(*args).compile()
    # one row per device instead of all eight
    assert pinned.memory_analysis().temp_size_in_bytes < free.memory_analysis().temp_size_in_bytes / 2
    a, b = pinned(*args)[2], free(*args)[2]  # and the numbers do not change
    np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(a["grad_norm"]), float(b["grad_norm"]), rtol=1e-5)


def test_params_carry_nnx_sharding_metadata():
    """The logical axes are NNX's own `out_sharding` metadata, so nnx.get_partition_spec reads
    them (mesh axes under the rules table); the placed specs are NNX's with the fallback: a mesh
    axis once per array, replicated where it does not divide the dimension."""
    P = jax.sharding.PartitionSpec
    mesh = shd.make_mesh({"data": 1, "fsdp": 2, "tensor": 4}, devices(8))
    cfg = tiny_model_config()
    state = nnx.state(nnx.eval_shape(lambda: LlavaModel(cfg, rngs=None)), nnx.Param)
    assert nnx.get_partition_spec(state)["llm"]["embed"].get_value() == P("vocab", "embed")
    with nnx.logical_axis_rules(shd.flax_rules()):
        nnx_specs = nnx.get_partition_spec(state)
    assert nnx_specs["projector"]["linear_1_kernel"].get_value() == P("fsdp", "fsdp")
    assert nnx_specs["vision"]["layers"]["q_kernel"].get_value() == P(None, "fsdp", "tensor", None)
    placed = shd.state_specs(state, mesh)
    assert placed["projector"]["linear_1_kernel"] == P("fsdp", None)
    assert placed["vision"]["layers"]["q_kernel"] == P(None, "fsdp", None, None)  # 2 heads, tensor=4
    assert placed["llm"]["layers"]["q_kernel"] == P(None, "fsdp", "tensor", None)
    # the abstract model (trainer init, HF loading, AOT) carries exactly these shardings
    _, abstract = shd.abstract_model(lambda: LlavaModel(cfg, rngs=None), mesh)
    flat = {path: v.get_value().sharding.spec for path, v in nnx.to_flat_state(abstract)}
    assert flat == dict(nnx.to_flat_state(placed)) and len(flat) > 30


def test_splash_attention_runs_per_device_in_the_sharded_step():
    """The splash kernel is a custom call GSPMD cannot split: in the sharded step it runs under
    shard_map (rows over data x fsdp, heads over tensor). Loss and gradient norm equal the `xla`
    attention's on the same mesh (the kernel in interpret mode on CPU)."""
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices(8))
    out = {}
    for impl in ("xla", "splash"):
        cfg = tiny_model_config().with_runtime(attention_impl=impl)
        graphdef, trainable, frozen = split_model(sharded_model(mesh, cfg), [r"projector/.*", r"llm/.*"])
        tx, schedule = make_optimizer(optim_config(), 10, trainable)
        opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, trainable, mesh))(trainable)
        batch = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim))
                 for k, v in synthetic_batch(cfg, batch=8, length=64).items()}
        step = jax.jit(build.with_batch_sharded_activations(make_train_step(graphdef, tx, schedule), mesh))
        lowered = step.lower(trainable, opt_state, frozen, batch, jnp.asarray(0, jnp.int32))
        # per device (shard_map = a manual computation): 2 of the 8 rows, 2 of the 4 query heads
        assert ("sdy.manual_computation" in lowered.as_text()) == (impl == "splash")
        out[impl] = lowered.compile()(trainable, opt_state, frozen, batch, jnp.asarray(0, jnp.int32))[2]
    np.testing.assert_allclose(float(out["splash"]["loss"]), float(out["xla"]["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(out["splash"]["grad_norm"]), float(out["xla"]["grad_norm"]), rtol=1e-4)
