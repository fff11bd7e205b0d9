"""Orbax checkpoints of a training run.

A checkpoint holds what a resume needs and nothing it can rebuild: the TRAINABLE params, the
optimizer state, the step, the RNG key and the input iterator's state. Frozen params come back
from where they were loaded (HF dirs, a stage-1 workdir, or the seeded init), so a stage-1
checkpoint of a 7B run is the projector plus its Adam moments, like the original
`mm_projector.bin`. Restoring takes abstract arrays carrying the CURRENT mesh's shardings, so a
run may resume on a different mesh shape.

Multi-host: every process calls save/restore (Orbax writes each host's shards and syncs them);
the workdir must be shared by all hosts (a `gs://` bucket or a shared file system). Each host
reads its own input shard, so the input iterator states of all processes are gathered and
stored together in the JSON part (written by process 0); on restore each process takes its own.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from llava_jax.fileio import as_path


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
        self.directory = as_path(workdir) / "checkpoints"  # local or gs://
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, trainable, opt_state, rng, data_state: Any = None, meta: dict | None = None):
        data = _jsonable(data_state)
        if jax.process_count() > 1:  # one state per process, in process order
            data = {"per_process": _allgather_json(data), "process_count": jax.process_count()}
        extra = {"step": int(step), "rng": np.asarray(jax.random.key_data(rng)).tolist(),
                 "data": data, "meta": meta or {}}
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
        data = _this_process_data(extra["data"], step, self.directory)
        return r.params, r.opt_state, int(extra["step"]), rng, _from_jsonable(data), extra.get("meta", {})

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


def _allgather_json(obj) -> list:
    """Every process's `obj` (JSON-able), on every process, in process order."""
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int64)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    everyone = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(everyone, lengths)]


def _this_process_data(data, step, directory):
    n, i = jax.process_count(), jax.process_index()
    saved_n = data["process_count"] if isinstance(data, dict) and "per_process" in data else 1
    if saved_n != n:
        raise ValueError(
            f"checkpoint {directory}/{step} holds the input-pipeline state of {saved_n} process(es), this run "
            f"has {n}. Each process reads its own data shard, so the input order cannot be resumed on a "
            "different process count: resume with the same number of hosts, or start a new workdir with "
            "model.init_from_workdir pointing at this one.")
    return data["per_process"][i] if n > 1 else data

