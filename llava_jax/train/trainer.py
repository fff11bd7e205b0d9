"""The two-stage LLaVA trainer: one readable loop in banner sections.

    mesh -> tokenizer + model (params created/loaded straight into their shards) -> input
    pipeline -> freezing + optimizer + compiled step (all from llava_jax/build.py) -> restore ->
    loop (log, checkpoint, SIGTERM, NaN stop) -> final checkpoint.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax import build
from llava_jax import sharding as shd
from llava_jax.fileio import as_path
from llava_jax import integrity
from llava_jax.checkpoint import Checkpointer
from llava_jax.train.metrics import MetricsWriter, peak_flops_per_device
from llava_jax.train_step import param_count_by_subtree, step_flops

log = logging.getLogger(__name__)

class TrainingStopped(RuntimeError):
    """The run stopped early (non-finite loss); the last good checkpoint is kept."""


# =============================================================================== train
def train(config, workdir: str) -> dict:
    workdir_p = as_path(workdir)  # local or gs://
    workdir_p.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0

    # ---------------------------------------------------------------- mesh, model, data, step
    # (all assembled by llava_jax/build.py; this module is the loop)
    run = build.training_run(config, workdir)
    mesh, model_cfg, data = run.mesh, run.model_config, run.data
    data_iter, num_steps, num_shards = data.iterator, data.num_steps, data.shard[1]
    trainable, opt_state, frozen, step_fn = run.parts.trainable, run.parts.opt_state, run.parts.frozen, run.parts.step
    del run  # only the loop's names hold the params and optimizer state (donated to each step)
    trains = set(param_count_by_subtree(trainable))

    # ---------------------------------------------------------------- restore
    ckpt = Checkpointer(workdir, keep=config.train.keep, async_save=config.train.async_checkpoint)
    rng = jax.random.key(config.train.seed)
    step = 0
    restored = ckpt.restore_latest(trainable, opt_state)  # a damaged newest step: the one before
    if restored is not None:
        trainable, opt_state, step, rng, data_state, _ = restored
        if data_state is not None:
            data_iter.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, step)

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
            # images the tower encodes (AnyRes: every real view, base + tiles)
            n_images = (int(stats["num_views"]) if "num_views" in stats
                        else int(np.asarray(batch["image_mask"]).sum()) if "image_mask" in batch else 0)
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
        writer.close(final_step=step if status == "data exhausted" else None)
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    skips = getattr(data_iter, "skip_log", None)
    if skips is not None and skips.total:  # counted all along (metrics); said once at the end
        log.info("%s%s", skips, f"; listed in {as_path(workdir) / config.data.skip_log}" if config.data.skip_log else "")
    # The frozen params' values as one digest (checksums of their bits, the same on any mesh and
    # process count): equal to a fresh build's, it shows the base (a LoRA run's LLM, the tower)
    # left training bit-identical. Every process takes part (the sums are collectives).
    frozen_digest = integrity.json_digest(integrity.tree_checksums(frozen))
    # `last` (the last logged metrics) must not override the step the run really ended at
    summary = {**last, "status": status, "step": step, "num_steps": num_steps, "frozen_digest": frozen_digest}
    if is_main:
        (workdir_p / "train_summary.json").write_text(json.dumps(summary, indent=2))
        log.info("training %s at step %d", status, step)
    return summary


def _global_array(x, mesh, num_shards: int = 1):
    """Process-local rows -> one global array sharded over the batch axes."""
    x = np.asarray(x)
    sharding = shd.batch_sharding(mesh, x.ndim)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * num_shards, *x.shape[1:]))


def _reached_preemption(step: int) -> bool:
    from jax.experimental import multihost_utils

    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # preemption service disabled
        return False
