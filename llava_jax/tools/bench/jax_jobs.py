"""The llava-jax measurements: training steps (the trainer's own step) and `Engine` decoding.

JAX is imported inside the functions only: importing this module must not touch the device.
"""
from __future__ import annotations

import contextlib
import inspect
import re
import statistics
import time
from pathlib import Path
from typing import Any

from llava_jax.tools.bench.workload import Geometry, prompt_tokens, train_tokens, variant_label


def _jax_env() -> dict[str, Any]:
    import jax

    d = jax.devices()[0]
    return {"device": f"{d.platform}:{d.device_kind}", "device_kind": d.device_kind, "platform": d.platform}


def _jax_peak_bytes(compiled=None) -> tuple[float | None, str]:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "device"
    if compiled is not None:  # CPU: XLA's own estimate for the compiled step
        try:
            m = compiled.memory_analysis()
            total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
            return float(total), "xla-estimate"
        except Exception:  # noqa: BLE001
            pass
    return None, "n/a"


@contextlib.contextmanager
def _jax_trace(profile_dir: str, label: str):
    """jax.profiler trace, its files then moved flat into `profile_dir` as `<label>.<name>` (the
    profiler nests them 3 folders down; flat names are easier to fetch from a remote machine)."""
    import shutil

    import jax

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", label)
    tmp = Path(profile_dir) / f".{safe}.tmp"
    with jax.profiler.trace(str(tmp)):
        yield
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            shutil.move(str(f), str(Path(profile_dir) / f"{safe}.{f.name}"))
    shutil.rmtree(tmp, ignore_errors=True)


class _Attrs(dict):
    __getattr__ = dict.__getitem__


def _random_model(cfg):
    """Random weights initialised on the device under jit. The rbg PRNG: threefry's init graph
    for a few hundred params takes minutes to compile on a small CPU."""
    import jax
    from flax import nnx

    from llava_jax.models.llava import LlavaModel

    key = jax.random.key(0, impl="rbg")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(key))))
    state = jax.jit(lambda k: nnx.split(LlavaModel(cfg, rngs=nnx.Rngs(k)))[1])(key)
    return nnx.merge(graphdef, state)


def jax_train(geo: Geometry, stage: int, variant: dict, opts: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llava_jax.config import RuntimeOptions
    from llava_jax.train_step import cast_frozen, make_optimizer, make_train_step, split_model

    rt = RuntimeOptions(dtype=jnp.bfloat16, param_dtype=getattr(jnp, variant["param_dtype"]),
                        remat_policy=variant["remat"], attention_impl=variant["attention"])
    cfg = geo.llava_config(rt)
    t0 = time.perf_counter()
    model = _random_model(cfg)
    patterns = [r"projector/.*"] + ([r"llm/.*"] if stage == 2 else [])
    graphdef, trainable, frozen = split_model(model, patterns)
    del model
    if variant["frozen_bf16"]:
        frozen = cast_frozen(frozen, jnp.bfloat16)
    # The trainer's optimizer (AdamW + warmup-cosine + global-norm clipping); the fields of
    # train.defaults' `optim` group, without ml_collections (absent from the GPU image).
    ocfg = _Attrs(lr=2e-5, schedule="cosine", warmup_ratio=0.0, warmup_steps=1, weight_decay=0.0, b1=0.9,
                  b2=0.999, eps=1e-8, grad_clip=opts["grad_clip"])
    total = geo.warmup + geo.steps
    tx, schedule = make_optimizer(ocfg, total, trainable)
    opt_state = jax.jit(tx.init)(trainable)
    step_fn = jax.jit(make_train_step(graphdef, tx, schedule, loss_chunk=variant["loss_chunk"]), donate_argnums=(0, 1))

    ids, labels = train_tokens(geo)
    targets = np.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    b, l = ids.shape
    rng = np.random.default_rng(2)
    batch = {
        "input_ids": jnp.asarray(ids), "targets": jnp.asarray(targets),
        "segment_ids": jnp.ones((b, l), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)),
        "images": jnp.asarray(rng.integers(0, 256, (b, 1, geo.image_size, geo.image_size, 3), np.uint8)),
        "image_mask": jnp.ones((b, 1), bool),
    }
    compiled = step_fn.lower(trainable, opt_state, frozen, batch, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    for i in range(geo.warmup):
        trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, batch, jnp.int32(i))
    loss0 = float(metrics["loss"]) if geo.warmup else float("nan")
    jax.block_until_ready(trainable)

    def timed(n, start):
        nonlocal trainable, opt_state, metrics
        t = time.perf_counter()
        for i in range(n):
            trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, batch, jnp.int32(start + i))
        jax.block_until_ready((trainable, metrics))
        return time.perf_counter() - t

    sec = timed(geo.steps, geo.warmup)
    if opts.get("profile_dir"):
        with _jax_trace(opts["profile_dir"], f"jax_stage{stage}_{variant_label(variant)}"):
            timed(min(2, geo.steps), total)
    peak, src = _jax_peak_bytes(compiled)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss}")
    return {**_jax_env(), "sec_per_step": sec / geo.steps, "peak_bytes": peak, "peak_source": src,
            "compile_s": compile_s, "loss_first": loss0, "loss_last": loss}


def jax_decode(geo: Geometry, batch: int, variant: dict, opts: dict) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from llava_jax.config import RuntimeOptions
    from llava_jax.serve.engine import Engine, SamplingParams

    # Serving weights in bf16 unless `serve_dtype` says otherwise; the attention impl only matters
    # for the prefill here.
    dt = getattr(jnp, variant.get("serve_dtype", "bfloat16"))
    rt = RuntimeOptions(dtype=dt, param_dtype=dt, attention_impl=variant["attention"])
    cfg = geo.llava_config(rt)
    t0 = time.perf_counter()
    kw = {"chunk_size": opts["decode_chunk"]} if opts.get("decode_chunk") and \
        "chunk_size" in inspect.signature(Engine).parameters else {}
    engine = Engine(_random_model(cfg), **kw)
    prompts = [list(map(int, r)) for r in prompt_tokens(geo, batch)]
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (batch, 1, geo.image_size, geo.image_size, 3), np.uint8)
    image_mask = np.ones((batch, 1), bool)

    def gen(n):
        t = time.perf_counter()
        out = engine.generate(prompts, images, image_mask, params=SamplingParams(max_new_tokens=n), eos_ids=())
        dt = time.perf_counter() - t
        if any(len(o) != n for o in out):
            raise RuntimeError(f"asked for {n} tokens, got {[len(o) for o in out]}")
        return dt

    gen(geo.new_tokens), gen(1)  # compile both shapes
    compile_s = time.perf_counter() - t0
    t1 = statistics.median(gen(1) for _ in range(geo.decode_repeats))
    tn = statistics.median(gen(geo.new_tokens) for _ in range(geo.decode_repeats))
    if opts.get("profile_dir"):
        with _jax_trace(opts["profile_dir"], f"jax_decode_b{batch}_{variant_label(variant)}"):
            gen(geo.new_tokens)
    peak, src = _jax_peak_bytes()
    return {**_jax_env(), "prefill_s": t1, "total_s": tn,
            "sec_per_step": max(tn - t1, 0.0) / (geo.new_tokens - 1), "peak_bytes": peak, "peak_source": src,
            "compile_s": compile_s}
