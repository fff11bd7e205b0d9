"""Orbax checkpoints of a training run.

A checkpoint holds what a resume needs and nothing it can rebuild: the TRAINABLE params, the
optimizer state, the step, the RNG key and the input iterator's state. Frozen params come back
from where they were loaded (HF dirs, a stage-1 workdir, or the seeded init), so a stage-1
checkpoint of a 7B run is the projector plus its Adam moments, like the original
`mm_projector.bin`. Restoring takes abstract arrays carrying the CURRENT mesh's shardings, so a
run may resume on a different mesh shape.

A step folder holds four Orbax items: `params/` and `opt_state/` (arrays), `extra/` (the JSON
part: step, RNG key, meta, checksums) and `data_iterator/`, written by Grain's own Orbax handler
(`grain.checkpoint.CheckpointSave`): one `process_<i>-of-<n>.json` per process, the state of that
process's input iterator. Each host reads its own input shard, so each process writes and
restores its own file; a run resumes only on the same process count.

Multi-host: every process calls save/restore (Orbax writes each host's shards and syncs them);
the workdir must be shared by all hosts (a `gs://` bucket or a shared file system).

Damage: every save records checksums of its arrays, of its JSON part and of every process's
iterator state (`integrity.py` says why values, not files); `restore` checks them and raises
`DamagedCheckpoint`, one line naming the step and its file, for those and for anything Orbax or
Grain cannot read. `restore_latest` (the trainer's resume) reports a damaged step, moves it aside
to `checkpoints/N.damaged` and takes the newest intact step, or raises when none is intact.
Checkpoints saved before checksums existed (no "integrity" in the JSON part) are restored
unverified, as before: only what Orbax itself checks. Checkpoints of earlier versions keep the
iterator state inside the JSON part ("data": one state, or every process's under "per_process");
they restore as before.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp

from llava_jax.convert.hf import CheckpointError
from llava_jax.fileio import as_path, is_remote
from llava_jax import integrity

log = logging.getLogger(__name__)

ITERATOR = "data_iterator"  # the item Grain's handler writes: one file per process


class DamagedCheckpoint(CheckpointError):
    """A checkpoint step that cannot be restored as saved; the message is one line naming the
    step and the file (or item folder) at fault."""

    def __init__(self, step: int, where: str, message: str | None = None):
        super().__init__(message or f"checkpoint step {step} is damaged: {where}")
        self.step, self.where = step, where


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _json_leaf(x):
    """`json.dumps` default: bytes (tagged) and numpy scalars in an iterator state."""
    if isinstance(x, bytes):
        return {"__bytes__": x.hex()}
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"an input iterator state holds a {type(x).__name__}, which JSON cannot store")


def _json_object(d: dict):
    """`json.loads` object hook, the inverse of `_json_leaf`."""
    return bytes.fromhex(d["__bytes__"]) if set(d) == {"__bytes__"} else d


class _IteratorState:
    """The item Grain's Orbax handler saves and restores: one process's iterator state (what the
    trainer's `it.get_state()` gave). It hands the handler the state as JSON bytes, which Grain
    writes to this process's file as they are (as it does for its DataLoader iterators), and
    takes the file's bytes back on restore."""

    def __init__(self, state: Any = None):
        self.raw = json.dumps(state, default=_json_leaf).encode() if state is not None else b""

    def get_state(self) -> bytes:
        return self.raw

    def set_state(self, raw: bytes) -> None:
        self.raw = raw

    def start_prefetch(self) -> None:  # Grain's handler calls it after set_state (grain >= 0.2.18)
        pass


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
        items = {"params": ocp.args.StandardSave(trainable), "opt_state": ocp.args.StandardSave(opt_state)}
        extra = {"step": int(step), "rng": np.asarray(jax.random.key_data(rng)).tolist(),
                 ITERATOR: None, "meta": meta or {}}
        sums = {"params": integrity.tree_checksums(trainable), "opt_state": integrity.tree_checksums(opt_state)}
        if data_state is not None:  # every process saves its own state (its own file)
            state = _IteratorState(data_state)
            items[ITERATOR] = grain_ckpt.CheckpointSave(state)
            extra[ITERATOR] = {"process_count": jax.process_count()}
            sums[ITERATOR] = _allgather_digests(integrity.json_digest(json.loads(state.raw)))
        extra = json.loads(json.dumps(extra))  # as a restore reads it back, for the digest
        extra["integrity"] = {**sums, "json": integrity.json_digest(extra)}
        self.manager.save(step, args=ocp.args.Composite(**items, extra=ocp.args.JsonSave(extra)), force=True)

    def restore(self, step: int, trainable_like, opt_state_like):
        """Restore onto the shardings of `*_like` (arrays or ShapeDtypeStructs with shardings);
        `DamagedCheckpoint` when the step is not what was saved."""
        extra = self.extra(step)
        params = self._read(step, "params", ocp.args.StandardRestore(_abstract(trainable_like)), extra)
        opt_state = self._read(step, "opt_state", ocp.args.StandardRestore(_abstract(opt_state_like)), extra)
        rng = jax.random.wrap_key_data(np.asarray(extra["rng"], np.uint32))
        if ITERATOR in extra:
            data = self._read_iterator_state(step, extra)
        else:  # the layout of earlier versions: the state(s) in the JSON part
            data = _this_process_data(extra["data"], step, self.directory)
            data = json.loads(json.dumps(data), object_hook=_json_object)
        return params, opt_state, int(extra["step"]), rng, data, extra.get("meta", {})

    def restore_latest(self, trainable_like, opt_state_like):
        """`restore` of the newest intact step, or None without checkpoints. A damaged newer
        step is reported (one warning line) and moved aside, so the resumed run can save that
        step again and no later reader takes it for the latest; with no intact step, one
        `DamagedCheckpoint` naming each step and file (nothing moved: the user decides)."""
        damaged: list[DamagedCheckpoint] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                got = self.restore(step, trainable_like, opt_state_like)
                error = None
            except DamagedCheckpoint as e:
                got, error = None, e
            error = _agreed(error, step)
            if error is None:
                if damaged:
                    moved = [self._move_aside(e.step) for e in damaged]
                    log.warning("resuming from step %d, the newest intact checkpoint (damaged: %s)",
                                step, ", ".join(moved))
                return got
            log.warning("%s", error)
            damaged.append(error)
        if damaged:
            raise DamagedCheckpoint(damaged[0].step, damaged[0].where, (
                f"no intact checkpoint in {self.directory}: "
                + "; ".join(f"step {e.step} is damaged: {e.where}" for e in damaged)
                + ". Move the damaged step folders aside to start this run over, or use a new workdir"))
        return None

    def restore_params(self, step: int, trainable_like):
        """Only the params (e.g. a stage-1 projector into a stage-2 run), checked like `restore`."""
        return self._read(step, "params", ocp.args.StandardRestore(_abstract(trainable_like)), self.extra(step))

    def param_paths(self, step: int) -> set[str] | None:
        """The param paths (`vision/...`, `projector/...`) a step saved, from its metadata alone;
        None when that is unreadable (`restore_params` then says what is damaged)."""
        try:
            meta = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "params")
        except Exception:  # noqa: BLE001 - judged by the restore that follows
            return None
        return {"/".join(str(getattr(k, "key", k)) for k in keys[:-1])  # the last key is nnx's "value"
                for keys, _ in jax.tree_util.tree_flatten_with_path(meta)[0]}

    def extra(self, step: int) -> dict:
        """The JSON part (step, rng, meta, ...) without reading arrays."""
        extra = self._read(step, "extra", ocp.args.JsonRestore())
        if (not isinstance(extra, dict) or not {"step", "rng"} <= extra.keys()
                or not ({"data", ITERATOR} & extra.keys())):
            raise DamagedCheckpoint(step, f"{self.directory / str(step) / 'extra'}: not a llava-jax checkpoint's JSON part")
        saved = extra.get("integrity")
        if saved is not None:
            rest = {k: v for k, v in extra.items() if k != "integrity"}
            if integrity.json_digest(rest) != saved.get("json"):
                raise DamagedCheckpoint(step, f"{self.directory / str(step) / 'extra'}: the JSON part does not match "
                                              "the checksum saved with it")
        return extra

    def _read(self, step: int, item: str, arg, extra: dict | None = None):
        """One item of a step, restored and (when `extra` holds its checksums) verified."""
        folder = self.directory / str(step) / item
        problem = integrity.item_error(self.directory / str(step), item)
        if problem is None:
            try:
                with integrity.quiet_failed_reads():
                    value = getattr(self.manager.restore(step, args=ocp.args.Composite(**{item: arg})), item)
            except Exception as e:  # noqa: BLE001 - whatever Orbax/TensorStore raise on bad files
                problem = f"{folder}: {integrity.one_line(e)}"
        if problem is not None:
            raise DamagedCheckpoint(step, problem)
        saved = (extra or {}).get("integrity", {}).get(item)
        if saved:
            bad = integrity.mismatched_arrays(value, saved)
            if bad:
                more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
                raise DamagedCheckpoint(step, f"{folder}: array {bad[0]}{more} does not match the checksum saved with it")
        return value

    def _read_iterator_state(self, step: int, extra: dict):
        """This process's input iterator state from the step's `data_iterator` item (None when
        the run saved none), checked against the checksum saved with it."""
        saved = extra[ITERATOR]
        if saved is None:
            return None
        _check_process_count(saved["process_count"], step, self.directory)
        state = self._read(step, ITERATOR, grain_ckpt.CheckpointRestore(_IteratorState()))
        i, n = jax.process_index(), jax.process_count()
        file = self.directory / str(step) / ITERATOR / f"process_{i}-of-{n}.json"
        try:
            plain = json.loads(state.raw)
        except ValueError as e:
            raise DamagedCheckpoint(step, f"{file}: not valid JSON ({integrity.one_line(e, 120)})") from None
        sums = extra.get("integrity", {}).get(ITERATOR)
        if sums and integrity.json_digest(plain) != sums[i]:
            raise DamagedCheckpoint(step, f"{file}: the input iterator state does not match the checksum saved with it")
        return json.loads(state.raw, object_hook=_json_object)

    def _move_aside(self, step: int) -> str:
        """Step folder N -> N.damaged (kept for inspection; Orbax lists only numeric names). On
        an object store, where a folder cannot be renamed, it is deleted."""
        src = self.directory / str(step)
        if is_remote(src):
            self.manager.delete(step)  # every process calls it; Orbax deletes from the primary host
            return f"step {step} deleted"
        dst, k = src.with_name(f"{step}.damaged"), 1
        while dst.exists():
            k += 1
            dst = src.with_name(f"{step}.damaged{k}")
        if jax.process_index() == 0:
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"llava_jax checkpoint {step} moved aside")
        self.manager.reload()
        return f"step {step} moved to {dst}"

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def _agreed(error: DamagedCheckpoint | None, step: int) -> DamagedCheckpoint | None:
    """Every process takes the same step: one that any process could not restore is damaged
    for all (each host reads its own shards, so a bad file may show on one host only)."""
    if jax.process_count() == 1:
        return error
    from jax.experimental import multihost_utils

    bad = multihost_utils.process_allgather(np.asarray([error is not None], np.int32)).reshape(-1)
    if error is None and bad.any():
        return DamagedCheckpoint(step, f"process(es) {np.flatnonzero(bad).tolist()} could not restore it")
    return error


def _allgather_digests(digest: str) -> list[str]:
    """Every process's sha256 hex digest, on every process, in process order."""
    if jax.process_count() == 1:
        return [digest]
    from jax.experimental import multihost_utils

    everyone = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(digest), np.uint8))
    return [bytes(row).hex() for row in np.asarray(everyone).reshape(jax.process_count(), -1)]


def _check_process_count(saved_n: int, step, directory):
    n = jax.process_count()
    if saved_n != n:
        raise ValueError(
            f"checkpoint {directory}/{step} holds the input-pipeline state of {saved_n} process(es), this run "
            f"has {n}. Each process reads its own data shard, so the input order cannot be resumed on a "
            "different process count: resume with the same number of hosts, or start a new workdir with "
            "model.init_from_workdir pointing at this one.")


def _this_process_data(data, step, directory):
    """This process's state from the JSON part of a checkpoint of an earlier version."""
    per_process = isinstance(data, dict) and "per_process" in data
    _check_process_count(data["process_count"] if per_process else 1, step, directory)
    return data["per_process"][jax.process_index()] if per_process else data
