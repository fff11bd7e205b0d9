"""Training LoRA adapters: the loss falls, the base (LLM kernels, tower) stays bit-identical,
the optimizer holds Adam moments for the adapters and the projector only, and each learning-rate
group (`optim.group_lr`) steps at its own rate; through the trainer's own assembly (`build`) on
a sharded mesh with dropout and gradient accumulation."""
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax import build
from llava_jax import sharding as shd
from llava_jax.models.lora import LoraConfig
from llava_jax.models.params import path_str
from llava_jax.train_step import make_optimizer, make_train_step, split_model
from test_trainer import cmd, run, world  # noqa: F401 - world: the shapes-world fixture
from train_util import IMAGE_TOKEN, devices, optim_config, params_by_path, recipes, synthetic_batch, tiny_model

TRAINABLE = (r".*lora.*", r"projector/.*")


def _assert_each_group_moved_by_its_lr(before, trainable, lr, proj_lr) -> None:
    """Adam's first step moves a param by its group's lr at most (|m / sqrt(v)| <= 1): the
    largest move of the adapters is `lr`, of the projector `proj_lr`."""
    moved = {p: np.abs(v - before[p]).max() for p, v in params_by_path(trainable).items()}
    np.testing.assert_allclose(max(v for p, v in moved.items() if "/lora/" in p), lr, rtol=1e-4)
    np.testing.assert_allclose(max(v for p, v in moved.items() if p.startswith("projector/")), proj_lr, rtol=1e-4)


def _moments(opt_state) -> int:
    return sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)


@pytest.mark.slow  # CI time (22 s)
def test_lora_over_a_bf16_base_keeps_the_base_bf16_and_bit_identical():
    """The issue's "the base can be bf16": with `model.dtype=bfloat16` and `model.cast_frozen`, the
    trainer's assembly stores the frozen LLM kernels in bf16 (half the memory), the adapters and
    the projector stay fp32 with Adam moments for them only, the loss falls and the bf16 base
    leaves training bit-identical."""
    from llava_jax.demo.run import load_demo_config

    config = load_demo_config("tiny_stage2_lora")
    config.model.scratch.text.update(hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4)
    config.model.dtype, config.model.cast_frozen = "bfloat16", True
    config.optim.lr, config.optim.warmup_steps = 1e-2, 0
    mesh = shd.make_mesh((1, 1, 1), devices=devices(1))
    model = build.model(config, mesh, types.SimpleNamespace(image_token_id=IMAGE_TOKEN), vocab_size=64)
    parts = build.train_parts(config, mesh, model, num_steps=20)
    frozen, trainable = params_by_path(parts.frozen), params_by_path(parts.trainable)
    assert frozen["llm/layers/q_kernel"].dtype == jnp.bfloat16 and frozen["llm/embed"].dtype == jnp.bfloat16
    assert {v.dtype for v in trainable.values()} == {np.dtype(np.float32)}
    assert _moments(parts.opt_state) == 2 * sum(v.size for v in trainable.values())
    batch = synthetic_batch(model.config)
    state, opt_state, losses = parts.trainable, parts.opt_state, []
    for i in range(8):
        state, opt_state, m = parts.step(state, opt_state, parts.frozen, batch, jnp.asarray(i + 1))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    for path, v in params_by_path(parts.frozen).items():
        np.testing.assert_array_equal(v, frozen[path], err_msg=path)


@pytest.mark.slow  # ~35 s on 2 cores (compiles); the preset test below checks the same through build
def test_lora_trains_adapters_and_projector_only():
    model = tiny_model(lora=LoraConfig(rank=4, alpha=8, dropout=0.1))
    before = params_by_path(nnx.state(model, nnx.Param))
    graphdef, trainable, frozen = split_model(model, TRAINABLE)
    assert set(params_by_path(trainable)) == {p for p in before if "/lora/" in p or p.startswith("projector/")}
    lr, proj_lr = 1e-2, 1e-3
    # no warm-up: the first step runs at the full lr (with a warm-up, optax's first lr is 0)
    tx, sched = make_optimizer(optim_config(lr, warmup_steps=0, group_lr=((r"projector/.*", proj_lr),)), 20,
                               trainable)
    opt_state = jax.jit(tx.init)(trainable)
    n_trainable = sum(v.size for v in params_by_path(trainable).values())
    assert _moments(opt_state) == 2 * n_trainable  # mu and nu of adapters + projector, nothing else
    step = jax.jit(make_train_step(graphdef, tx, sched, dropout_seed=0))
    batch = synthetic_batch(model.config)
    losses = []
    for i in range(12):
        trainable, opt_state, m = step(trainable, opt_state, frozen, batch, jnp.asarray(i + 1))
        losses.append(float(m["loss"]))
        if i == 0:
            _assert_each_group_moved_by_its_lr(before, trainable, lr, proj_lr)
    assert losses[-1] < losses[0] - 0.05, losses
    after = params_by_path(frozen)
    assert set(after) == {p for p in before if "/lora/" not in p and not p.startswith("projector/")}
    for path, old in after.items():
        np.testing.assert_array_equal(old, before[path], err_msg=path)  # the base: bit-identical
    assert np.abs(params_by_path(trainable)["llm/layers/lora/q_b"]).max() > 0


@pytest.mark.slow  # CI time (22 s)
def test_tiny_lora_preset_through_build_on_a_sharded_mesh():
    from llava_jax.demo.run import load_demo_config

    config = load_demo_config("tiny_stage2_lora")
    config.model.scratch.text.update(hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4)
    lr, proj_lr = 1e-2, 1e-3
    config.optim.lr, config.optim.group_lr = lr, ((r"projector/.*", proj_lr),)
    config.optim.warmup_steps = 0  # the first step at the full lr (optax's warm-up starts at 0)
    mesh = shd.make_mesh((2, 2, 2), devices=devices(8))
    model = build.model(config, mesh, types.SimpleNamespace(image_token_id=IMAGE_TOKEN), vocab_size=64)
    assert model.config.lora == LoraConfig(rank=8, alpha=16.0, dropout=0.05)
    assert model.llm.layers.lora.q_a.value.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    before = params_by_path(nnx.state(model, nnx.Param))
    parts = build.train_parts(config, mesh, model, num_steps=20)
    assert _moments(parts.opt_state) == 2 * sum(v.size for v in params_by_path(parts.trainable).values())
    batch = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim))
             for k, v in synthetic_batch(model.config).items()}
    trainable, opt_state, losses = parts.trainable, parts.opt_state, []
    for i in range(8):
        trainable, opt_state, m = parts.step(trainable, opt_state, parts.frozen, batch, jnp.asarray(i + 1))
        losses.append(float(m["loss"]))
        if i == 0:
            _assert_each_group_moved_by_its_lr(before, trainable, lr, proj_lr)
    assert losses[-1] < losses[0], losses
    for path, v in params_by_path(parts.frozen).items():
        np.testing.assert_array_equal(v, before[path], err_msg=path)
    # dropout (rate 0.05 in the preset) draws masks only with a key, the same masks for one key
    trained = nnx.merge(parts.graphdef, trainable, parts.frozen)
    fwd = nnx.jit(lambda m, rng: m(batch["input_ids"][:, 6:], dropout_rng=rng))
    plain, a, b = fwd(trained, None), fwd(trained, jax.random.key(0)), fwd(trained, jax.random.key(1))
    assert not np.allclose(a, plain) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, fwd(trained, jax.random.key(0)))


def test_lora_run_started_from_an_adapter_begins_at_its_loss_and_trains(tmp_path):
    """`model.lora.init_adapter`: a stage-2 LoRA run (the tiny preset through `build`, fsdp 2)
    started from an adapter in the original LLaVA's layout (adapter_model.bin and the projector in
    non_lora_trainables.bin) has at step 0 the loss of the model merged with that adapter and
    projector, and trains; an adapter of another rank, alpha or projections is refused, naming
    the file and the shapes."""
    pytest.importorskip("torch")
    from hf_util import original_lora_dir
    from llava_jax.convert import peft as lpeft
    from llava_jax.convert.hf import CheckpointError, hf_tensors
    from llava_jax.demo.run import load_demo_config
    from llava_jax.train_step import batch_loss

    config = load_demo_config("tiny_stage2_lora")  # rank 8, alpha 16, the seven projections
    config.model.scratch.text.update(hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4)
    config.model.lora.dropout = 0.0  # step 0's loss is then the adapted model's own
    config.optim.lr, config.optim.warmup_steps = 1e-2, 0
    mesh = shd.make_mesh((1, 2, 1), devices=devices(2))
    ids = types.SimpleNamespace(image_token_id=IMAGE_TOKEN)
    src = build.model(config, mesh, ids, vocab_size=64)
    batch = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in synthetic_batch(src.config).items()}

    def loss_of(model):
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
        s, n = jax.jit(batch_loss, static_argnums=2)(trainable, frozen, graphdef, batch)
        return float(s / n)

    fresh = loss_of(src)  # B = 0: the base's loss
    key = jax.random.key(3)  # adapters and a projector that do something
    for sub in (src.llm.layers.lora, src.projector):
        for name, var in sorted(nnx.state(sub, nnx.Param).items()):
            key, k = jax.random.split(key)
            getattr(sub, name).value = jax.device_put(0.2 * jax.random.normal(k, var.value.shape), var.value.sharding)
    lpeft.save_adapter(src, tmp_path / "peft")
    projector = {k.removeprefix("multi_modal_projector."): v
                 for k, v in hf_tensors(src, select=lambda p: p.startswith("projector/"))}
    adapter = original_lora_dir(tmp_path / "peft", tmp_path / "lora-run", projector)
    merged = loss_of(lpeft.merge(src))

    config.model.lora.init_adapter = str(adapter)
    model = build.model(config, mesh, ids, vocab_size=64)
    assert model.llm.layers.lora.q_b.value.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    parts = build.train_parts(config, mesh, model, num_steps=20)
    trainable, opt_state, losses = parts.trainable, parts.opt_state, []
    for i in range(4):
        trainable, opt_state, m = parts.step(trainable, opt_state, parts.frozen, batch, jnp.asarray(i + 1))
        losses.append(float(m["loss"]))
    print("fresh", fresh, "merged", merged, "run", losses)
    np.testing.assert_allclose(losses[0], merged, rtol=1e-5)
    assert abs(fresh - merged) > 1e-3  # the adapter and projector matter (100x the tolerance above)
    assert losses[-1] < losses[0], losses

    for field, value, match in (
            ("rank", 4, r"lora-run/adapter_config.json has r=8 \(base_model.model.model.layers.0.self_attn.q_proj."
                        r"lora_A.weight in adapter_model.bin has shape \(8, 16\)\), model.lora.rank=4 expects \(4, 16\)"),
            ("alpha", 32.0, r"lora_alpha=16, model.lora.alpha=32"),
            ("targets", (r"llm/layers/(q|v)_kernel",), r"targets: the adapter adapts self_attn.q_proj, .*mlp.down_proj; "
                                                        r"model.lora.targets=.* adapt self_attn.q_proj, self_attn.v_proj$")):
        bad = config.copy_and_resolve_references()
        bad.model.lora[field] = value
        with pytest.raises(CheckpointError, match=match):  # before any param is made
            build.model(bad, mesh, ids, vocab_size=64)


def _lora_specs(state) -> dict:
    return {path_str(p): v.get_value().sharding.spec for p, v in nnx.to_flat_state(state) if "/lora/" in path_str(p)}


@pytest.mark.slow  # CI time (34 s); adapter specs on a 2x2x2 mesh stay in CI (test_lora.py)
def test_lora_factors_shard_over_fsdp_and_train_as_the_replicated_layout():
    """On an FSDP-only mesh every LoRA factor is split over `fsdp`: those without an `embed` axis
    (B of q/k/v/gate/up, A of o/down) over their rank (`lora_rank` in the rules table), so no
    factor, nor its Adam moments, sits whole on every chip. Two train steps (the second through
    a non-zero B) give what the old layout (rank replicated) gives."""
    from llava_jax.demo.run import load_demo_config

    P = jax.sharding.PartitionSpec
    config = load_demo_config("tiny_stage2_lora")  # rank 8
    config.model.scratch.text.update(hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4)
    config.optim.warmup_steps = 0
    mesh = shd.make_mesh((1, 8, 1), devices=devices(8))
    model = build.model(config, mesh, types.SimpleNamespace(image_token_id=IMAGE_TOKEN), vocab_size=64)
    specs = _lora_specs(nnx.state(model))
    assert len(specs) == 14 and all("fsdp" in spec for spec in specs.values()), specs
    assert specs["llm/layers/lora/q_b"] == P(None, "fsdp", None, None)  # [layers, rank, heads, head_dim]
    assert specs["llm/layers/lora/o_a"] == P(None, None, None, "fsdp")  # [layers, heads, head_dim, rank]
    assert specs["llm/layers/lora/q_a"] == P(None, "fsdp", None)  # [layers, embed, rank]: embed keeps fsdp
    for p, v in nnx.to_flat_state(nnx.state(model.llm.layers.lora)):
        x = v.get_value()
        assert x.addressable_shards[0].data.size * 8 == x.size, p  # one eighth per device

    # the same values in the old layout (new buffers: the steps donate their inputs)
    graphdef, state = nnx.split(model)
    replicated_rank = shd.state_shardings(state, mesh, {**shd.LOGICAL_RULES, "lora_rank": ()})
    moved = jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s, may_alias=False)), state,
                         replicated_rank, is_leaf=lambda x: isinstance(x, nnx.Variable))
    old = nnx.merge(graphdef, moved)
    assert _lora_specs(nnx.state(old))["llm/layers/lora/q_b"] == P(None, None, None, None)
    batch = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in synthetic_batch(model.config).items()}
    results = []
    for m in (model, old):
        parts = build.train_parts(config, mesh, m, num_steps=20)
        trainable, opt_state, metrics = parts.trainable, parts.opt_state, []
        for i in (1, 2):
            trainable, opt_state, out = parts.step(trainable, opt_state, parts.frozen, batch, jnp.asarray(i))
            metrics.append((float(out["loss"]), float(out["grad_norm"])))
        results.append((metrics, params_by_path(trainable)))
    (new_metrics, new_params), (old_metrics, old_params) = results
    np.testing.assert_allclose(new_metrics, old_metrics, rtol=1e-6)
    assert set(new_params) == set(old_params)
    for path, v in new_params.items():
        np.testing.assert_allclose(v, old_params[path], rtol=1e-5, atol=1e-7, err_msg=path)
    assert np.abs(new_params["llm/layers/lora/q_b"]).max() > 0  # step 2 ran through a non-zero B


def test_a_rank_fsdp_does_not_divide_is_replicated():
    """Rank 4 on fsdp 8: the rank axis falls back to replication (as any indivisible dimension
    does), and a factor with an `embed` axis still shards it."""
    from llava_jax.models.llava import LlavaModel
    from train_util import tiny_model_config

    P = jax.sharding.PartitionSpec
    cfg = tiny_model_config(lora=LoraConfig(rank=4, alpha=8))
    _, state = shd.abstract_model(lambda: LlavaModel(cfg, rngs=None), shd.make_mesh((1, 8, 1), devices(8)))
    specs = _lora_specs(state)
    assert specs["llm/layers/lora/q_b"] == P(None, None, None, None)
    assert specs["llm/layers/lora/down_b"] == P(None, None, "fsdp")  # [layers, rank, embed]
    assert specs["llm/layers/lora/q_a"] == P(None, "fsdp", None)


@pytest.mark.slow  # a trainer and two export subprocesses: minutes on 2 busy cores
def test_trained_adapter_exports_as_peft_and_merged_alike(world, tmp_path):  # noqa: F811 - the fixture
    """`python -m llava_jax.train` with the LoRA preset, then `export --format=peft` and the
    default (merged) export: the base + the exported adapter computes what the merged model does."""
    import llava_jax
    from llava_jax.convert import peft as lpeft
    from llava_jax.demo.run import load_demo_config

    w = tmp_path / "run"
    run(cmd(world, w, "tiny_stage2_lora", "--config.train.num_steps=3", "--config.optim.lr=1e-2"))
    for fmt, out in (("peft", tmp_path / "adapter"), ("hf", tmp_path / "merged")):
        run([sys.executable, "-m", "llava_jax.export", f"--format={fmt}", f"--workdir={w}", f"--out={out}",
             "--allow_random_init"])  # the tiny preset's tower and LLM are seeded, not loaded
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8
    config = load_demo_config("tiny_stage2_lora")
    config.tokenizer_path = str(world / "tok")
    tok, ids = build.tokenizer(config)
    base = build.model(config, shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]), ids, vocab_size=len(tok))
    base, _ = build.apply_workdir_params(base, str(w), [r"projector/.*"])  # the trained projector
    base = lpeft.merge(base)  # fresh adapters (B = 0) merge into exactly the base, and go
    adapted = lpeft.load_adapter(base, tmp_path / "adapter")
    merged = llava_jax.from_pretrained(tmp_path / "merged")
    cfg = merged.config
    x = np.array([[1] + [cfg.image_token_id] * cfg.num_image_tokens + [5, 6, 7, 8]])
    px = np.random.default_rng(0).normal(size=(1, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    a, b = np.asarray(adapted(x, pixel_values=px)), np.asarray(merged(x, pixel_values=px))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert np.abs(np.asarray(adapted.llm.layers.lora.q_b.value)).max() > 0  # the adapter trained


def test_step_flops_count_the_adapters_on_a_frozen_llm():
    from llava_jax.train_step import param_count_by_subtree, step_flops
    from train_util import tiny_model_config

    lora = LoraConfig(rank=2, alpha=4, targets=(r"llm/layers/(q|down)_kernel",))
    cfg = tiny_model_config(lora=lora)  # hidden 16, mlp 32, 4 heads x 4, 2 layers
    # q: A 16x2 + B 2x(4*4); down: A 32x2 + B 2x16; two layers; fwd 2 + bwd 4 per weight
    n_lora = 2 * (16 * 2 + 2 * 16 + 32 * 2 + 2 * 16)
    extra = step_flops(cfg, {"projector", "lora"}, 100, 3, 50) - step_flops(cfg.replace(lora=None), {"projector"},
                                                                              100, 3, 50)
    assert extra == 100 * 6 * n_lora
    from llava_jax.models.llava import LlavaModel

    counts = param_count_by_subtree(split_model(LlavaModel(cfg, rngs=None), TRAINABLE)[1])  # zeros: quick
    assert set(counts) == {"projector", "lora"} and counts["lora"] == n_lora


@pytest.mark.slow  # three trainer subprocesses: minutes on 2 busy cores
def test_lora_run_killed_and_restarted_gives_the_uninterrupted_losses(world, tmp_path):  # noqa: F811
    """SIGKILL mid-run, then the same command: the LoRA preset (adapters + projector in two
    learning-rate groups, dropout on) resumes to exactly the uninterrupted losses, so the
    per-group optimizer state, the step and the dropout keys all come back from the checkpoint."""
    from test_trainer import losses, run_and_sigkill

    steps = ["--config.train.num_steps=12", "--config.train.ckpt_every=3", "--config.optim.lr=1e-2"]
    ref = tmp_path / "ref"
    run(cmd(world, ref, "tiny_stage2_lora", *steps))
    want = losses(ref)
    assert sorted(want) == list(range(1, 13))
    w = tmp_path / "run"
    run_and_sigkill(cmd(world, w, "tiny_stage2_lora", *steps), w, 8)  # step 3 is saved (async) by then
    assert max(losses(w)) < 12
    saved = [int(d.name) for d in (w / "checkpoints").iterdir() if d.name.isdigit()]
    assert saved and max(saved) < 12  # the restart resumes from a checkpoint, not from scratch
    p = run(cmd(world, w, "tiny_stage2_lora", *steps))
    assert "resumed from" in p.stdout + p.stderr
    got = losses(w)
    assert [got[s] for s in range(1, 13)] == [want[s] for s in range(1, 13)]  # exactly equal


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_lora_and_qlora_presets_are_the_original_finetune_lora_recipe(size):
    """configs/llava_v1_5.py `{7b,13b}_lora` are the original scripts/v1_5/finetune_lora.sh (r 128,
    alpha 256, dropout 0.05 on the seven projections, lr 2e-4, mm_projector_lr 2e-5, stage 2 of
    vicuna_v1 at batch 128), training adapters + projector only, each at its lr; `_qlora` is the
    same over an int4 base."""
    from llava_jax.models.llava import LlavaModel
    from llava_jax.train_step import lr_groups
    from train_util import tiny_model_config

    v1_5 = recipes("llava_v1_5")
    lora_cfg, qlora_cfg = v1_5.get_config(f"{size}_lora"), v1_5.get_config(f"{size}_qlora")
    for c in (lora_cfg, qlora_cfg):
        lora = build.lora_config(c)
        assert lora == LoraConfig(rank=128, alpha=256.0, dropout=0.05) and lora.scale == 2.0 and not lora.rslora
        assert lora.modules == ("q", "k", "v", "o", "gate", "up", "down") and not c.model.lora.init_adapter
        assert tuple(c.trainable) == TRAINABLE
        assert c.optim.lr == 2e-4 and tuple(map(tuple, c.optim.group_lr)) == ((r"projector/.*", 2e-5),)
        assert (c.stage, c.data.template, c.train.global_batch, c.optim.schedule, c.optim.warmup_ratio,
                c.optim.weight_decay) == (2, "vicuna_v1", 128, "cosine", 0.03, 0.0)
        assert c.model.llm_path == f"vicuna-{size}-v1.5" and c.model.init_from_workdir_patterns == (r"projector/.*",)
    assert build.base_quant(lora_cfg) is None and lora_cfg.name == f"llava-v1.5-{size}-lora"
    assert build.base_quant(qlora_cfg) == "int4" and qlora_cfg.name == f"llava-v1.5-{size}-qlora"
    # what trains, at which lr: adapters at optim.lr, the projector in its group (zeros: quick)
    _, trainable, frozen = split_model(LlavaModel(tiny_model_config(lora=build.lora_config(lora_cfg)), rngs=None),
                                       lora_cfg.trainable)
    lrs, labels = lr_groups(lora_cfg.optim, trainable)
    by_path = {path_str(p): lrs[v.get_value()] for p, v in nnx.to_flat_state(labels)}
    assert {p for p, lr in by_path.items() if lr == 2e-5} == {p for p in by_path if p.startswith("projector/")}
    assert {p for p, lr in by_path.items() if lr == 2e-4} == {p for p in by_path if "/lora/" in p} != set()
    assert not any("/lora/" in path_str(p) or path_str(p).startswith("projector/") for p, _ in nnx.to_flat_state(frozen))
