"""Supervised pretraining of a from-scratch vision tower on the shapes world: the offline demo's
stand-in for CLIP's pretraining.

The real recipe starts from a pretrained CLIP whose patch features already say what is where.
Nothing pretrained exists offline, and a tower trained from scratch only through the language
loss has to discover shapes and the LLM has to learn where to look at the same time: measured on
the demo (2026-11-22), that chicken-and-egg left both stages at chance. So the demo first trains
the tower alone to name, for every patch of a grid-layout image (one object per patch, see
`llava_jax.demo.scenes.ShapesWorld(grid=...)`), the colour and shape of the object in it (or "empty") and
the patch's row and column, plus the (colour, shape) pair as one class, with linear heads on the
feature layer LLaVA reads: "what is where", which is what LLaVA relies on CLIP's patch features
for. Measured on the demo (2026-11-22): without the row/column heads the features lost their
position and position questions stayed at chance; without the pair head ("red circle" as one
feature, as CLIP has from captions) existence questions ("Is there a red circle?") ended
between 44% and 88% in four demo runs (figures: BENCHMARKS.md, "Offline demo"). The tower is
then frozen in stages 1 and 2, as in the
real recipe. The checkpoint is an ordinary trainer workdir (trainable = `vision/.*`), so stage 1
takes it with `model.init_from_workdir` like any previous stage.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llava_jax.data.images import load_image, normalize, preprocess_image_uint8

TOWER_PATTERNS = (r"vision/.*",)


def cell_labels(annotations: list[dict], grid: int, colors: list[str], shapes: list[str]):
    """Per-patch targets [N, grid*grid] (row-major, like the ViT's patch order): colour index and
    shape index, 0 = empty cell, else 1 + the index in `colors` / `shapes`."""
    col = np.zeros((len(annotations), grid * grid), np.int32)
    shp = np.zeros_like(col)
    for i, ann in enumerate(annotations):
        for inst in ann["instances"]:
            x0, y0, x1, y1 = inst["bbox"]
            cx, cy = min(grid - 1, int((x0 + x1) / 2 * grid)), min(grid - 1, int((y0 + y1) / 2 * grid))
            color, shape = inst["category"].split(" ", 1)
            col[i, cy * grid + cx] = 1 + colors.index(color)
            shp[i, cy * grid + cx] = 1 + shapes.index(shape)
    return col, shp


def _load(data_dir: Path, name: str, size: int, mode: str):
    anns = [json.loads(x) for x in (data_dir / name).read_text().splitlines() if x.strip()]
    imgs = np.stack([preprocess_image_uint8(load_image(data_dir / "images" / a["image"]), mode, size) for a in anns])
    return anns, imgs


def pretrain_tower(model, data_dir, workdir, *, steps: int = 300, batch_size: int = 64, lr: float = 3e-3,
                   clip: float = 1.0, image_mode: str = "pad", seed: int = 0, combo: bool = True,
                   log=print) -> dict:
    """Train `model.vision` (in place) on per-patch colour/shape labels; save it to `workdir` as a
    trainer checkpoint; return held-out per-patch accuracies."""
    from llava_jax.checkpoint import Checkpointer
    from llava_jax.train_step import split_model

    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    cfg = model.config
    world = json.loads((data_dir / "manifest.json").read_text())["config"]
    colors, shapes, grid = list(world["colors"]), list(world["shapes"]), int(world.get("grid") or 0)
    n_patch = cfg.vision.image_size // cfg.vision.patch_size
    if grid != n_patch:
        raise ValueError(f"tower pretraining needs a grid-layout world with one cell per patch: the world's "
                         f"grid is {grid}, the tower has {n_patch}x{n_patch} patches")
    train_anns, train_imgs = _load(data_dir, "annotations.jsonl", cfg.vision.image_size, image_mode)
    eval_anns, eval_imgs = _load(data_dir, "eval_annotations.jsonl", cfg.vision.image_size, image_mode)
    train_y = cell_labels(train_anns, grid, colors, shapes)
    eval_y = cell_labels(eval_anns, grid, colors, shapes)

    graphdef, tower, frozen = split_model(model, TOWER_PATTERNS)
    dim = cfg.projector_in_features
    key = jax.random.key(seed)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    heads = {"color": 0.02 * jax.random.normal(k1, (dim, len(colors) + 1)),
             "shape": 0.02 * jax.random.normal(k2, (dim, len(shapes) + 1)),
             "combo": 0.02 * jax.random.normal(k5, (dim, len(colors) * len(shapes) + 1)),
             "row": 0.02 * jax.random.normal(k3, (dim, grid)),
             "col": 0.02 * jax.random.normal(k4, (dim, grid))}
    rows = jnp.repeat(jnp.arange(grid), grid)  # patch k sits at (k // grid, k % grid)
    cols = jnp.tile(jnp.arange(grid), grid)
    params = {"tower": tower, "heads": heads}
    # Clipping matters: without it the run diverged after ~300 steps at this lr and the row/column
    # heads fell back to chance (patch position 79% -> 33% at 800 steps); with it every head
    # reaches ~100% on held-out images (measured 2026-11-22).
    tx = optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps),
                                 weight_decay=0.0))
    opt_state = tx.init(params)

    def logits(params, images):
        m = nnx.merge(graphdef, params["tower"], frozen)
        feats = m.vision(normalize(images), cfg.feature_layers, cfg.vision_feature_select_strategy)
        feats = feats.astype(jnp.float32)
        return {k: feats @ w for k, w in params["heads"].items()}

    def loss_fn(params, images, yc, ys):
        lg = logits(params, images)
        ce = optax.softmax_cross_entropy_with_integer_labels
        pos = jnp.broadcast_to(rows, yc.shape), jnp.broadcast_to(cols, yc.shape)
        loss = (ce(lg["color"], yc).mean() + ce(lg["shape"], ys).mean()
                + ce(lg["row"], pos[0]).mean() + ce(lg["col"], pos[1]).mean())
        if combo:  # the (colour, shape) pair as one class
            pair = jnp.where(yc > 0, (yc - 1) * len(shapes) + ys, 0)  # 1 + colour-major index, 0 = empty
            loss = loss + ce(lg["combo"], pair).mean()
        return loss

    @jax.jit
    def step(params, opt_state, images, yc, ys):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, yc, ys)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def predict(params, images):
        lg = logits(params, images)
        return (lg["color"].argmax(-1), lg["shape"].argmax(-1),
                lg["row"].argmax(-1) * grid + lg["col"].argmax(-1), lg["combo"].argmax(-1))

    rng = np.random.default_rng(seed)
    loss = float("nan")
    for i in range(steps):
        idx = rng.integers(0, len(train_imgs), batch_size)
        params, opt_state, loss = step(params, opt_state, train_imgs[idx], train_y[0][idx], train_y[1][idx])
        if (i + 1) % max(1, steps // 4) == 0:
            log(f"[tower] step {i + 1}/{steps} loss {float(loss):.4f}")
    preds = [predict(params, eval_imgs[s:s + 256]) for s in range(0, len(eval_imgs), 256)]
    pc, ps, pp, pk = (np.concatenate([np.asarray(p[i]) for p in preds]) for i in range(4))
    occupied = eval_y[0] > 0
    pair = np.where(occupied, (eval_y[0] - 1) * len(shapes) + eval_y[1], 0)
    result = {
        "steps": steps, "loss": float(loss),
        "cell_color_acc": float((pc == eval_y[0]).mean()), "cell_shape_acc": float((ps == eval_y[1]).mean()),
        "object_color_acc": float((pc == eval_y[0])[occupied].mean()),
        "object_shape_acc": float((ps == eval_y[1])[occupied].mean()),
        "object_pair_acc": float((pk == pair)[occupied].mean()) if combo else None,
        "patch_position_acc": float((pp == np.arange(grid * grid)).mean()),
        "seconds": time.perf_counter() - t0,
    }
    nnx.update(model, params["tower"])
    ck = Checkpointer(workdir, keep=1, async_save=False)
    ck.save(steps, params["tower"], {"heads": params["heads"]}, jax.random.key(seed),
            meta={"trainable": list(TOWER_PATTERNS), "tower_pretrain": result})
    ck.wait()
    ck.close()
    return result
