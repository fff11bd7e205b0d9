"""Tiny models, configs and synthetic batches for trainer tests (no pipeline needed), and the
damage done to checkpoints in the checkpoint tests."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.models.llava import LlavaModel
from llava_jax.train.defaults import base_config

IMAGE_TOKEN = 60


def recipes(name: str):
    """configs/<name>.py as a module (get_config and its tables), loaded by path: configs/ is
    not a package."""
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model_config(**kw) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=16, patch_size=8),
        text=TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=4),
        image_token_id=IMAGE_TOKEN, **kw)


def tiny_model(seed=0, **kw) -> LlavaModel:
    return LlavaModel(tiny_model_config(**kw), rngs=nnx.Rngs(seed))


def synthetic_batch(cfg: LlavaConfig, batch=8, length=16, max_images=1, seed=0):
    """Rows: [bos, image tokens..., text]; targets = next token within the row, prompt masked."""
    rng = np.random.default_rng(seed)
    t = cfg.num_image_tokens
    ids = rng.integers(3, cfg.text.vocab_size, (batch, length)).astype(np.int32)
    ids[ids == cfg.image_token_id] = 5
    has_image = rng.random(batch) < 0.75
    ids[:, 0] = 1
    ids[has_image, 1:1 + t] = cfg.image_token_id
    seg = np.ones((batch, length), np.int32)
    cut = rng.integers(length - 3, length + 1, batch)
    for b in range(batch):
        seg[b, cut[b]:] = 0
        ids[b, cut[b]:] = 0
    targets = np.full((batch, length), -100, np.int32)
    targets[:, :-1] = ids[:, 1:]
    targets[:, : 1 + t] = -100
    targets[seg == 0] = -100
    targets[:, :-1][seg[:, 1:] == 0] = -100
    s = cfg.vision.image_size
    images = rng.integers(0, 256, (batch, max_images, s, s, 3)).astype(np.uint8)
    image_mask = np.zeros((batch, max_images), bool)
    image_mask[has_image, 0] = True
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
    return {"input_ids": ids, "targets": targets, "segment_ids": seg, "positions": pos,
            "images": images, "image_mask": image_mask}


def run_steps(model, patterns, batch, steps=2, accum=1, mesh=None, lr=1e-2):
    """`steps` train steps of `model` on one batch (the trainer's own step function): (trainable,
    frozen, optimizer state, losses)."""
    import jax.numpy as jnp

    from llava_jax import sharding as shd
    from llava_jax.train_step import make_optimizer, make_train_step, split_model

    graphdef, trainable, frozen = split_model(model, patterns)
    if mesh is not None:
        trainable = jax.device_put(trainable, shd.state_shardings(trainable, mesh))
        frozen = jax.device_put(frozen, shd.state_shardings(frozen, mesh))
        batch = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    tx, sched = make_optimizer(optim_config(lr), 10, trainable)
    opt_state = jax.jit(tx.init)(trainable)
    step = jax.jit(make_train_step(graphdef, tx, sched, accum))
    losses = []
    for i in range(steps):
        trainable, opt_state, m = step(trainable, opt_state, frozen, batch, jnp.asarray(i + 1))
        losses.append(float(m["loss"]))
    return trainable, frozen, opt_state, losses


def optim_config(lr=1e-2, **kw):
    c = base_config().optim
    c.lr = lr
    c.warmup_steps = 1
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def params_by_path(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.value) for p, v in nnx.to_flat_state(state)}


def devices(n):
    d = jax.devices()
    if len(d) < n:
        import pytest

        pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count={n})")
    return d[:n]


# --------------------------------------------------------------------------- checkpoint damage
# Each takes a step folder (WORKDIR/checkpoints/N), damages it and returns the part of it that an
# error message must name.
def _files(d: Path) -> list[Path]:
    return sorted((f for f in d.rglob("*") if f.is_file()), key=lambda f: (f.stat().st_size, str(f)))


def _ocdbt_values(params_dir: Path) -> dict:
    """Every array chunk's stored bytes as Orbax's OCDBT store hands them out (fresh context, no
    cache); an unreadable chunk maps to None."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{params_dir}/"}, context=ts.Context()).result()
    out = {}
    for key in kv.list().result():
        if key.endswith((b".zarray", b"zarr.json")):
            continue
        try:
            out[key] = bytes(kv.read(key).result().value)
        except Exception:  # noqa: BLE001 - a damaged chunk is what we are looking for
            out[key] = None
    return out


def flip_params_data(step_dir: Path) -> str:
    """Flip 64 bytes that an array chunk really uses. A data file also holds bytes no chunk
    references (so a blind flip in its middle sometimes changed nothing and the damage test
    failed by chance): try places in the data files until a chunk reads back different."""
    params = step_dir / "params"
    clean = _ocdbt_values(params)
    data_files = [f for f in reversed(_files(params)) if f.parent.name == "d"]
    for f in data_files:
        original = f.read_bytes()
        for frac in (0.5, 0.25, 0.75, 0.1, 0.9, 0.4, 0.6):
            at = min(int(len(original) * frac), max(len(original) - 64, 0))
            b = bytearray(original)
            b[at:at + 64] = bytes(x ^ 0xFF for x in b[at:at + 64])
            f.write_bytes(bytes(b))
            if _ocdbt_values(params) != clean:
                return "params"
            f.write_bytes(original)
    raise AssertionError(f"no flip in {params} changed an array chunk")


def truncate(rel: str):
    def damage(step_dir: Path) -> str:
        f = _files(step_dir / "params")[-1] if rel == "params data" else step_dir / rel
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
        return "params" if rel == "params data" else rel

    return damage


def empty_folder(step_dir: Path) -> str:
    shutil.rmtree(step_dir)
    step_dir.mkdir()
    return str(step_dir.name)
