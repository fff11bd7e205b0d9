"""QLoRA: LoRA adapters trained over a frozen int8 / int4 LLM (`model.base_quant`), through the
trainer's own assembly (`build`) on a sharded mesh. The quantized base is exactly the serving
quantizer's output and computes within its bounds (tests/test_serve_quant.py: logits cosine
> 0.999 for int8, > 0.95 for int4), gets no gradient and no optimizer state, stays bit-identical,
is rebuilt identically on resume, and exports dequantized with the adapters merged."""
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax import build
from llava_jax import sharding as shd
from llava_jax.models.quant import KERNELS, quantize_array
from llava_jax.serve.quant import compare_logits
from llava_jax.checkpoint import Checkpointer
from test_trainer import cmd, run, world  # noqa: F401 - world: the shapes-world fixture
from train_util import IMAGE_TOKEN, devices, params_by_path, synthetic_batch

# the serving quantizer's documented bounds on a random tiny model (test_serve_quant.py)
MIN_COSINE = {"int8": 0.999, "int4": 0.95}
IDS = types.SimpleNamespace(image_token_id=IMAGE_TOKEN)


def _config(base_quant: str):
    from llava_jax.demo.run import load_demo_config

    config = load_demo_config("tiny_stage2_lora")
    # mlp 128: the down projection's int4 groups (64 inputs) are two per output channel
    config.model.scratch.text.update(hidden_size=32, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=8)
    config.model.base_quant = base_quant
    config.optim.lr, config.optim.warmup_steps = 1e-2, 0
    return config


def _model(config, mesh):
    return build.model(config, mesh, IDS, vocab_size=64)


def _batch(model, mesh):
    return {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in synthetic_batch(model.config).items()}


def _train(parts, batch, steps, trainable=None, opt_state=None, first=1):
    trainable = parts.trainable if trainable is None else trainable
    opt_state = parts.opt_state if opt_state is None else opt_state
    losses = []
    for i in range(first, first + steps):
        trainable, opt_state, m = parts.step(trainable, opt_state, parts.frozen, batch, jnp.asarray(i))
        losses.append(float(m["loss"]))
    return trainable, opt_state, losses


# int4 on a data x fsdp x tensor mesh (the scales shard like their kernels), int8 on one device
# (the int4 case in the slow set, CI time: an int4 base trains in CI in the checkpoint test below)
@pytest.mark.parametrize("mode, mesh_shape", [("int8", (1, 1, 1)),
                                              pytest.param("int4", (2, 2, 2), marks=pytest.mark.slow)])
def test_qlora_trains_adapters_over_a_frozen_quantized_base(mode, mesh_shape):
    mesh = shd.make_mesh(mesh_shape, devices=devices(int(np.prod(mesh_shape))))
    fp = _model(_config("none"), mesh)
    model = _model(_config(mode), mesh)
    assert model.config.base_quant == mode and model.config.lora is not None
    # the base is the serving quantizer's output of the same seeded fp base, in the kernels' shards
    layers, fp_layers = model.llm.layers, fp.llm.layers
    for name, (in_axes, group_axis) in KERNELS.items():
        q, s = quantize_array(getattr(fp_layers, name)[...], mode, in_axes, group_axis)
        np.testing.assert_array_equal(np.asarray(getattr(layers, name)[...]), np.asarray(q), err_msg=name)
        np.testing.assert_array_equal(np.asarray(getattr(layers, name + "_scale")[...]), np.asarray(s), err_msg=name)
        assert getattr(layers, name)[...].sharding.spec == getattr(fp_layers, name)[...].sharding.spec
    assert str(layers.down_kernel[...].dtype) == mode
    batch = _batch(model, mesh)
    # a fresh adapter is a no-op: the QLoRA model computes the quantized base, within its bound
    ids = batch["input_ids"][:, 6:]
    stats = compare_logits(nnx.jit(lambda m: m(ids))(fp), nnx.jit(lambda m: m(ids))(model))
    print(mode, stats)
    assert stats["cosine_mean"] > MIN_COSINE[mode]

    before = params_by_path(nnx.state(model, nnx.Param))
    parts = build.train_parts(_config(mode), mesh, model, num_steps=20)
    trains = set(params_by_path(parts.trainable))
    assert trains == {p for p in before if "/lora/" in p or p.startswith("projector/")}
    # Adam's mu and nu for the adapters and the projector only: nothing for the int base
    n_trainable = sum(v.size for v in params_by_path(parts.trainable).values())
    assert sum(x.size for x in jax.tree.leaves(parts.opt_state) if x.ndim > 0) == 2 * n_trainable
    trainable, _, losses = _train(parts, batch, 6)
    assert losses[-1] < losses[0] - 0.05, losses
    for path, v in params_by_path(parts.frozen).items():  # the quantized base (and the tower): bit-identical
        assert v.dtype == before[path].dtype, path
        np.testing.assert_array_equal(v, before[path], err_msg=path)
    assert np.abs(params_by_path(trainable)["llm/layers/lora/q_b"]).max() > 0


def test_qlora_is_refused_without_lora_and_its_base_cannot_train():
    config = _config("int8")
    config.model.lora.rank = 0
    with pytest.raises(ValueError, match=r"base_quant='int8'.*model.lora.rank"):
        build.model_config(config, 64, IMAGE_TOKEN)
    config = _config("int4")
    config.trainable = (r"llm/.*", r"projector/.*")
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"stored as integers.*llm/layers/down_kernel"):
        build.train_parts(config, mesh, _model(config, mesh), num_steps=4)


def test_qlora_checkpoint_restores_to_the_same_next_step(tmp_path):
    """Save after 2 steps, rebuild the model from the config (the base quantized again, not read
    from the checkpoint), restore: step 3 gives the uninterrupted run's loss, bit for bit."""
    from llava_jax.train_step import split_model

    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    config = _config("int4")
    model = _model(config, mesh)
    parts = build.train_parts(config, mesh, model, num_steps=20)
    batch = _batch(model, mesh)
    trainable, opt_state, _ = _train(parts, batch, 2)
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(2, trainable, opt_state, jax.random.key(0))
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (trainable, opt_state))
    _, _, want = _train(parts, batch, 1, trainable, opt_state, first=3)  # donates trainable, opt_state

    _, _, frozen = split_model(_model(config, mesh), list(config.trainable))
    frozen = build.frozen_for_training(frozen, config)
    old = params_by_path(parts.frozen)
    for path, v in params_by_path(frozen).items():
        np.testing.assert_array_equal(v, old[path], err_msg=path)
    params, opt, step, _, _, _ = ck.restore(2, *like)
    ck.close()
    assert step == 2
    _, _, m = parts.step(params, opt, frozen, batch, jnp.asarray(3))
    assert float(m["loss"]) == want[0]


def test_qlora_model_exports_dequantized_and_merged(tmp_path):
    """A QLoRA model written as llava-hf computes what it computed (fp32): the kernels are
    dequantized, then the adapters merged; `peft.merge` gives the same model in place, and the
    adapter alone on the fp base, served unmerged over the same quantization, too."""
    import llava_jax
    from llava_jax.convert import peft as lpeft
    from llava_jax.serve.quant import quantize_model

    config = _config("int4")
    config.model.dtype = "float32"
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = _model(config, mesh)
    key = jax.random.key(1)
    for name, var in sorted(nnx.state(model.llm.layers.lora, nnx.Param).items()):
        key, k = jax.random.split(key)
        getattr(model.llm.layers.lora, name).value = 0.2 * jax.random.normal(k, var.value.shape)
    ids = np.array([[1, 5, 9, 3, 7, 11, 2]])
    ref = np.asarray(model(ids))
    rel = lambda a: float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())
    llava_jax.save_pretrained(model, tmp_path / "hf")
    assert rel(llava_jax.from_pretrained(tmp_path / "hf")(ids)) <= 1e-5
    lpeft.save_adapter(model, tmp_path / "adapter")
    fp_base = lpeft.merge(_model(_config("none"), mesh))  # fresh adapters: merging drops them, base unchanged
    served = quantize_model(lpeft.load_adapter(fp_base, tmp_path / "adapter"), "int4")
    assert rel(served(ids)) <= 1e-6  # the same int4 base + the same fp32 adapters
    merged = lpeft.merge(model)
    assert merged.config.base_quant is None and merged.llm.layers.q_kernel[...].dtype == jnp.float32
    assert not hasattr(merged.llm.layers, "q_kernel_scale")
    assert rel(merged(ids)) <= 1e-5


@pytest.mark.slow  # three trainer subprocesses: minutes on 2 busy cores
def test_qlora_run_killed_and_restarted_gives_the_uninterrupted_losses(world, tmp_path):  # noqa: F811
    """The trainer CLI with the LoRA preset on an int4 base: SIGKILL mid-run, the same command
    resumes to exactly the uninterrupted losses (the base is rebuilt, not checkpointed)."""
    from test_trainer import losses, run_and_sigkill

    steps = ["--config.train.num_steps=12", "--config.train.ckpt_every=3", "--config.optim.lr=1e-2",
             "--config.model.base_quant=int4"]
    ref = tmp_path / "ref"
    run(cmd(world, ref, "tiny_stage2_lora", *steps))
    want = losses(ref)
    assert sorted(want) == list(range(1, 13)) and want[12] < want[1]
    w = tmp_path / "run"
    run_and_sigkill(cmd(world, w, "tiny_stage2_lora", *steps), w, 8)
    assert max(losses(w)) < 12
    p = run(cmd(world, w, "tiny_stage2_lora", *steps))
    assert "resumed from" in p.stdout + p.stderr
    got = losses(w)
    assert [got[s] for s in range(1, 13)] == [want[s] for s in range(1, 13)]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
