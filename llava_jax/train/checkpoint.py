"""Orbax checkpoints of a training run.

A checkpoint holds what a resume needs and nothing it can rebuild: the TRAINABLE params, the
optimizer state, the step, the RNG key and the input iterator's state. Frozen params come back
from where they were loaded (HF dirs, a stage-1 workdir, or the seeded init), so a stage-1
checkpoint of a 7B run is the projector plus its Adam moments, like the original
`mm_projector.bin`. Restoring takes abstract arrays carrying the CURRENT mesh's shardings, so a
run may resume on a different mesh shape.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _jsonable(x):
    if isinstance(x, bytes):
        return {"__bytes__": x.hex()}
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _from_jsonable(x):
    if isinstance(x, dict):
        if set(x) == {"__bytes__"}:
            return bytes.fromhex(x["__bytes__"])
        return {k: _from_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_jsonable(v) for v in x]
    return x


class Checkpointer:
    def __init__(self, workdir, keep: int = 3, async_save: bool = True):
        self.directory = Path(str(workdir)) / "checkpoints" if "://" not in str(workdir) else f"{workdir}/checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, trainable, opt_state, rng, data_state: Any = None, meta: dict | None = None):
        extra = {"step": int(step), "rng": np.asarray(jax.random.key_data(rng)).tolist(),
                 "data": _jsonable(data_state), "meta": meta or {}}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(trainable),
            opt_state=ocp.args.StandardSave(opt_state),
            extra=ocp.args.JsonSave(extra),
        ), force=True)

    def restore(self, step: int, trainable_like, opt_state_like):
        """Restore onto the shardings of `*_like` (arrays or ShapeDtypeStructs with shardings)."""
        r = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(trainable_like)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state_like)),
            extra=ocp.args.JsonRestore(),
        ))
        extra = r.extra
        rng = jax.random.wrap_key_data(np.asarray(extra["rng"], np.uint32))
        return r.params, r.opt_state, int(extra["step"]), rng, _from_jsonable(extra["data"]), extra.get("meta", {})

    def restore_params(self, step: int, trainable_like):
        """Only the params (e.g. a stage-1 projector into a stage-2 run)."""
        r = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(trainable_like))))
        return r.params

    def extra(self, step: int) -> dict:
        """The JSON part (step, rng, data state, meta) without reading arrays."""
        return self.manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, default=str))
