"""The two-stage LLaVA trainer: one readable loop in banner sections.

    mesh -> tokenizer + model (params created/loaded straight into their shards) -> freezing +
    optimizer -> input pipeline -> restore -> compiled step -> loop (log, checkpoint, SIGTERM,
    NaN stop) -> final checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from llava_jax.config import LlavaConfig, RopeConfig, RuntimeOptions, TextConfig, VisionConfig
from llava_jax.fileio import as_path
from llava_jax.models.llava import LlavaModel
from llava_jax.train import mesh as mesh_lib
from llava_jax.train.checkpoint import Checkpointer
from llava_jax.train.metrics import MetricsWriter, peak_flops_per_device
from llava_jax.train.state import (
    cast_frozen,
    count_params,
    make_optimizer,
    make_train_step,
    opt_state_shardings,
    param_count_by_subtree,
    split_model,
    step_flops,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TrainingStopped(RuntimeError):
    """The run stopped early (non-finite loss); the last good checkpoint is kept."""


# =============================================================================== tokenizer
def load_run_tokenizer(config):
    from llava_jax.data.tokenize import add_llava_special_tokens, load_tokenizer

    path = config.tokenizer_path or config.model.llm_path or config.model.hf_path
    if not path:
        raise ValueError("set config.tokenizer_path (or model.llm_path / model.hf_path)")
    tok = load_tokenizer(path)
    ids = add_llava_special_tokens(tok)
    return tok, ids


# =============================================================================== model
def runtime_options(config) -> dict:
    m = config.model
    return dict(dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], remat_policy=m.remat,
                attention_impl=m.attention_impl, loss_chunk=m.loss_chunk)


def frozen_for_training(frozen, config):
    """The frozen params as the train step holds them: in model.dtype when model.cast_frozen
    (`state.cast_frozen`: every use casts them to it anyway), else as loaded."""
    return cast_frozen(frozen, DTYPES[config.model.dtype]) if config.model.cast_frozen else frozen


def scratch_model_config(config, vocab_size: int, image_token_id: int) -> LlavaConfig:
    s = config.model.scratch
    v, t = s.vision, s.text
    return LlavaConfig(
        vision=VisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                            num_layers=v.num_layers, num_heads=v.num_heads, image_size=v.image_size,
                            patch_size=v.patch_size),
        text=TextConfig(vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                        num_layers=t.num_layers, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                        head_dim=t.head_dim, rope=RopeConfig(theta=t.rope_theta),
                        max_position_embeddings=t.max_position_embeddings),
        image_token_id=image_token_id,
        projector_type=config.model.projector_type,
        vision_feature_layer=config.model.vision_feature_layer,
        vision_feature_select_strategy=config.model.vision_feature_select_strategy,
        runtime=RuntimeOptions(**runtime_options(config)),
    )


def build_model(config, mesh, tokenizer_ids=None, vocab_size: int | None = None) -> LlavaModel:
    """The model with every param created or loaded directly into its shard (no full copy on
    one device), then the previous stage's trained params applied on top."""
    m = config.model
    rt = runtime_options(config)
    if m.init == "scratch":
        cfg = scratch_model_config(config, vocab_size, tokenizer_ids.image_token_id)
        abs_model = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(m.seed)))
        graphdef, abs_state = nnx.split(abs_model)
        shardings = mesh_lib.state_shardings(abs_state, mesh)

        @jax.jit
        def init():
            return nnx.split(LlavaModel(cfg, rngs=nnx.Rngs(m.seed)))[1]

        # Init runs once: on CPU, skip LLVM's optimisations (the random-number graphs of ~40
        # params otherwise take most of a tiny model's start-up to compile; 3x faster measured).
        opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
        state = jax.jit(init, out_shardings=shardings, compiler_options=opts)()
        model = nnx.merge(graphdef, state)
    else:
        from llava_jax.convert.hf import from_pretrained

        path = m.hf_path if m.init == "hf" else m.llm_path
        if not path:
            raise ValueError(f"model.init={m.init!r} needs model.{'hf_path' if m.init == 'hf' else 'llm_path'}")
        kw: dict[str, Any] = dict(clip_path=m.clip_path or None, projector_path=m.projector_path or None, **rt)
        if m.init == "clip_llama":
            kw.update(projector_type=m.projector_type, vision_feature_layer=m.vision_feature_layer)
        if tokenizer_ids is not None and m.init != "hf":
            kw["image_token_id"] = tokenizer_ids.image_token_id
        # Build the abstract model once to derive shardings from its param metadata.
        probe = _probe_config(path, kw)
        abs_model = nnx.eval_shape(lambda: LlavaModel(probe, rngs=None))
        model = from_pretrained(path, sharding_fn=mesh_lib.param_sharding_fn(abs_model, mesh), **kw)
    # Several previous stages: comma-separated workdirs, applied in order (later ones win).
    for wd in [w.strip() for w in str(m.init_from_workdir or "").split(",") if w.strip()]:
        model = apply_workdir_params(model, wd, m.init_from_workdir_patterns)
    return model


def _probe_config(path, kw) -> LlavaConfig:
    from llava_jax.convert.hf import _resolve_config

    cfg, _, _ = _resolve_config(Path(path), kw.get("clip_path"), kw.get("projector_type"),
                                kw.get("vision_feature_layer"), kw.get("image_token_id"))
    # every RuntimeOptions field, as `runtime_options` put them in kw
    return cfg.with_runtime(**{f.name: kw[f.name] for f in dataclasses.fields(RuntimeOptions)})


def apply_workdir_params(model: LlavaModel, workdir: str, patterns) -> LlavaModel:
    """Load a previous stage's trained params (its latest checkpoint) into `model`; only those
    matching `patterns` are taken (e.g. just `projector/.*` from a stage-1 run)."""
    import re

    ck = Checkpointer(workdir, async_save=False)
    step = ck.latest_step()
    if step is None:
        raise FileNotFoundError(f"init_from_workdir: no checkpoint in {workdir}/checkpoints")
    saved_patterns = ck.extra(step).get("meta", {}).get("trainable")
    if not saved_patterns:
        raise ValueError(f"init_from_workdir: checkpoint {workdir} step {step} does not record its trainable params")
    _, saved_like, _ = split_model(model, saved_patterns)
    restored = ck.restore_params(step, saved_like)
    ck.close()
    keep = [(p, v) for p, v in nnx.to_flat_state(restored)
            if any(re.fullmatch(x, "/".join(map(str, p))) for x in patterns)]
    if not keep:
        raise ValueError(f"init_from_workdir: none of the saved params ({saved_patterns}) match {list(patterns)}")
    nnx.update(model, nnx.from_flat_state(keep))
    logging.info("loaded %d params from %s step %d", len(keep), workdir, step)
    return model


# =============================================================================== data
def make_data_iterator(config, tokenizer, model_cfg: LlavaConfig, process_batch: int, workdir: str,
                       shard: tuple[int, int] = (0, 1)):
    """This process's input: shard `shard[0]` of `shard[1]` (see `mesh.process_data_shard`), in
    batches of `process_batch` rows. Skipped rows go to the workdir's skip log (one file per
    process when there are several)."""
    from llava_jax.data.pipeline import PipelineConfig, make_iterator, make_skip_log
    from llava_jax.data.sources import ConcatSource, sources_from_config

    d = config.data
    pcfg = PipelineConfig(
        max_length=d.max_length, max_images_per_row=d.max_images_per_row, image_size=model_cfg.vision.image_size,
        image_mode=d.image_mode, template=d.template, num_image_tokens=model_cfg.num_image_tokens,
        image_token_id=model_cfg.image_token_id, batch_size=process_batch, pack=d.pack, seed=d.seed,
        shuffle=d.shuffle, num_epochs=d.num_epochs, worker_count=d.worker_count, length_policy=d.length_policy,
    )
    sources = ConcatSource(sources_from_config(d.sources, d.image_folder))
    skip_path = None
    if d.skip_log:
        skip_path = as_path(workdir) / d.skip_log
        if jax.process_count() > 1:
            skip_path = skip_path.with_name(f"{skip_path.stem}.process{jax.process_index()}{skip_path.suffix}")
    it = make_iterator(sources, tokenizer, pcfg, process_index=shard[0], process_count=shard[1],
                       skip_log=make_skip_log(skip_path))
    return it, sources, pcfg


def estimate_num_steps(sources, tokenizer, pcfg, num_epochs: int, global_batch: int, probe: int = 256) -> int:
    """Optimizer steps for `num_epochs` passes: packed rows per sample measured on the first
    `probe` records (run through the real pipeline, with the training run's packing window),
    scaled to the whole source."""
    from llava_jax.data.pipeline import make_iterator

    n = len(sources)
    k = min(n, probe)
    sub = [sources[i] for i in range(k)]
    # One row per batch, but the training run's packing window (`num_bins` follows the batch
    # size by default): with a single open row the probe packed worse than training and
    # overestimated the steps by ~14% on the demo, so the cosine schedule was cut before its end.
    it = make_iterator(sub, tokenizer, pcfg.replace(batch_size=1, pack_bins=pcfg.num_bins, shuffle=False,
                                                    num_epochs=1, worker_count=0, drop_remainder=False,
                                                    prefetch_batches=0),
                       process_index=0, process_count=1)
    rows = sum(1 for _ in it)
    return max(1, math.ceil(n * num_epochs * max(rows, 1) / k / global_batch))


# =============================================================================== train
def train(config, workdir: str) -> dict:
    workdir_p = as_path(workdir)  # local or gs://
    workdir_p.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0

    # ---------------------------------------------------------------- mesh & batch geometry
    mesh = mesh_lib.make_mesh(dict(config.train.mesh))
    dp = mesh_lib.data_parallel_size(mesh)
    micro_global = config.train.per_device_batch * dp
    if config.train.global_batch % micro_global:
        raise ValueError(f"global_batch {config.train.global_batch} is not a multiple of per_device_batch "
                         f"{config.train.per_device_batch} x {dp} data-parallel devices")
    grad_accum = config.train.global_batch // micro_global
    # Each process reads the data shard whose rows its devices hold; the global batch is
    # assembled from the process-local rows (jax.make_array_from_process_local_data).
    shard = mesh_lib.process_data_shard(mesh)
    num_shards = shard[1]
    process_batch = config.train.global_batch // num_shards
    logging.info("mesh %s, global batch %d = %d per device x %d devices x %d accumulation; %d process(es), "
                 "input shard %d of %d (%d rows each)", dict(mesh.shape), config.train.global_batch,
                 config.train.per_device_batch, dp, grad_accum, jax.process_count(), shard[0], num_shards,
                 process_batch)

    # ---------------------------------------------------------------- tokenizer & model
    tokenizer, tok_ids = load_run_tokenizer(config)
    model = build_model(config, mesh, tok_ids, vocab_size=len(tokenizer))
    model_cfg: LlavaConfig = model.config
    if len(tokenizer) > model_cfg.text.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model vocab is {model_cfg.text.vocab_size}")

    # ---------------------------------------------------------------- freezing & optimizer
    graphdef, trainable, frozen = split_model(model, list(config.trainable))
    del model
    frozen = frozen_for_training(frozen, config)
    counts = param_count_by_subtree(trainable)
    trains = set(counts)
    logging.info("trainable params %s (%d); frozen %d", counts, count_params(trainable), count_params(frozen))

    data_iter, sources, pcfg = make_data_iterator(config, tokenizer, model_cfg, process_batch, workdir, shard)
    num_steps = config.train.num_steps
    if num_steps <= 0:  # one schedule over num_epochs of the data, in packed rows
        num_steps = estimate_num_steps(sources, tokenizer, pcfg, config.data.num_epochs, config.train.global_batch)
        logging.info("num_steps estimated at %d for %d epochs", num_steps, config.data.num_epochs)
    tx, schedule = make_optimizer(config.optim, num_steps, trainable)
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, trainable, mesh))(trainable)

    # ---------------------------------------------------------------- restore
    ckpt = Checkpointer(workdir, keep=config.train.keep, async_save=config.train.async_checkpoint)
    rng = jax.random.key(config.train.seed)
    step = 0
    latest = ckpt.latest_step()
    if latest is not None:
        trainable, opt_state, step, rng, data_state, _ = ckpt.restore(latest, trainable, opt_state)
        if data_state is not None:
            data_iter.set_state(data_state)
        logging.info("resumed from %s at step %d", ckpt.directory, step)

    # ---------------------------------------------------------------- compiled step
    tr_sh = jax.tree.map(lambda x: x.sharding, trainable)
    fr_sh = jax.tree.map(lambda x: x.sharding, frozen)
    os_sh = jax.tree.map(lambda x: x.sharding, opt_state)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())  # metrics: readable on every host
    train_step = make_train_step(graphdef, tx, schedule, grad_accum)
    step_fn = jax.jit(mesh_lib.with_batch_sharded_activations(train_step, mesh),
                      in_shardings=(tr_sh, os_sh, fr_sh, None, None),
                      out_shardings=(tr_sh, os_sh, replicated), donate_argnums=(0, 1))

    def to_global(batch):
        arrays = {k: v for k, v in batch.items() if k != "stats"}
        return {k: _global_array(v, mesh, num_shards) for k, v in arrays.items()}

    # ---------------------------------------------------------------- loop
    stop = {"sigterm": False}

    def on_sigterm(signum, frame):  # TPU preemption: save at the next step boundary and exit
        stop["sigterm"] = True

    # Several processes must save at the SAME step: JAX's preemption sync service (it catches
    # SIGTERM on any host) names a common step; alone, a Python handler sets the flag.
    multihost = jax.process_count() > 1
    old_handler = None if multihost else signal.signal(signal.SIGTERM, on_sigterm)
    ckpt_meta = {"config": config.name, "stage": config.stage, "trainable": list(config.trainable)}
    writer = MetricsWriter(workdir_p, enabled=is_main, tensorboard=config.train.tensorboard,
                           progress_total=num_steps, progress_bar=config.train.progress_bar, start=step)
    peak = config.train.peak_tflops * 1e12 if config.train.peak_tflops else peak_flops_per_device()
    seq_len = config.data.max_length
    skipped_total: dict[str, int] = {}
    last: dict[str, Any] = {}
    t_last = time.perf_counter()
    tokens_since = 0
    flops_since = 0.0
    samples_since = 0
    real_tokens_since = 0
    status = "completed"
    metrics = None

    def log_step(step, metrics):
        nonlocal last, status, t_last, tokens_since, flops_since, samples_since, real_tokens_since
        m = jax.device_get(metrics)
        loss = float(m["loss"])
        if not np.isfinite(loss):
            status = "non-finite loss"
            raise TrainingStopped(
                f"loss is {loss} at step {step}; stopping without saving this state. The last good "
                f"checkpoint (step {ckpt.latest_step()}) is kept in {ckpt.directory}. Lower the lr, "
                "check the data (skipped-row log) or use float32 compute to investigate.")
        dt = time.perf_counter() - t_last
        last = {
            "step": step, "loss": loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
            "supervised_tokens": int(m["tokens"]),
            "tokens_per_s": tokens_since / dt, "samples_per_s": samples_since / dt,
            "packing_efficiency": real_tokens_since / max(tokens_since, 1),
            "tflops_per_device": flops_since / dt / jax.device_count() / 1e12,
            **{k: v for k, v in skipped_total.items()},
        }
        if peak:
            last["mfu"] = flops_since / dt / jax.device_count() / peak
        writer.write(step, last)
        t_last, tokens_since, flops_since, samples_since, real_tokens_since = time.perf_counter(), 0, 0.0, 0, 0

    try:
        while step < num_steps:
            try:
                batch = next(data_iter)
            except StopIteration:
                status = "data exhausted"
                break
            stats = batch.get("stats", {})
            for k, v in stats.items():  # cumulative counters from the pipeline
                if k.startswith("total/skipped") or k == "total/truncated":
                    skipped_total[k[len("total/"):]] = int(v)
            n_images = int(np.asarray(batch["image_mask"]).sum()) if "image_mask" in batch else 0
            real = int((np.asarray(batch["segment_ids"]) > 0).sum())
            gb = to_global(batch)
            trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, gb, jnp.asarray(step, jnp.int32))
            step += 1
            if multihost and _reached_preemption(step):
                stop["sigterm"] = True
            rows, length = np.asarray(batch["input_ids"]).shape
            # this process's rows, scaled to the global batch (shards are equal-sized)
            tokens_since += rows * length * num_shards
            real_tokens_since += real * num_shards
            samples_since += int(stats.get("num_samples", 0)) * num_shards
            flops_since += step_flops(model_cfg, trains, rows * length * num_shards, n_images * num_shards, seq_len)
            log_now = step % config.train.log_every == 0 or step == num_steps
            if log_now or stop["sigterm"]:
                log_step(step, metrics)
            else:
                writer.advance(step)
            if step % config.train.ckpt_every == 0 or step == num_steps or stop["sigterm"]:
                ckpt.save(step, trainable, opt_state, rng, data_iter.get_state(),
                          meta=ckpt_meta)
            if stop["sigterm"]:
                status = "preempted (SIGTERM)"
                break
        if status == "data exhausted" and metrics is not None and last.get("step") != step:
            log_step(step, metrics)  # the run's real last step, whatever log_every says
        if status == "data exhausted" and step and ckpt.latest_step() != step:
            ckpt.save(step, trainable, opt_state, rng, data_iter.get_state(), meta=ckpt_meta)
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    # `last` (the last logged metrics) must not override the step the run really ended at
    summary = {**last, "status": status, "step": step, "num_steps": num_steps}
    if is_main:
        (workdir_p / "train_summary.json").write_text(json.dumps(summary, indent=2))
        logging.info("training %s at step %d", status, step)
    return summary


def _global_array(x, mesh, num_shards: int = 1):
    """Process-local rows -> one global array sharded over the batch axes."""
    x = np.asarray(x)
    sharding = mesh_lib.batch_sharding(mesh, x.ndim)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * num_shards, *x.shape[1:]))


def _reached_preemption(step: int) -> bool:
    from jax.experimental import multihost_utils

    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # preemption service disabled
        return False
