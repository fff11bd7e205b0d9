"""Checkpoints under damage: a step whose files were flipped, truncated or emptied is reported in
one line naming the step and the file, and the newest intact step is restored instead (the
damaged one moved aside); with none intact, one error line. Checkpoints written before checksums
existed, and those keeping the input iterator state in the JSON part, still restore. (End to end
through the trainer: test_trainer.py.)"""
from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llava_jax.convert.hf import CheckpointError
from llava_jax import integrity
from llava_jax.checkpoint import Checkpointer
from train_util import empty_folder, flip_params_data, truncate

# a damaged file fails many reads at once: Orbax's abandoned reads must not print a traceback each
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def trees(step: int):
    """Params and optimizer state like the trainer's: float arrays big enough that a flipped
    byte lands in array data, not only in Orbax's metadata."""
    rng = np.random.default_rng(step)
    params = {"projector": {"kernel": jnp.asarray(rng.normal(size=(128, 96)), jnp.float32),
                            "bias": jnp.asarray(rng.normal(size=(96,)), jnp.bfloat16)}}
    opt = {"count": jnp.asarray(step, jnp.int32), "mu": jax.tree.map(lambda x: x * 0.5, params)}
    return params, opt


def save_steps(workdir, steps=(3, 6), async_save=True):
    ck = Checkpointer(workdir, keep=5, async_save=async_save)
    for s in steps:
        params, opt = trees(s)
        ck.save(s, params, opt, jax.random.key(s), data_state={"epoch": s, "b": b"\x00\x01"}, meta={"trainable": ["x"]})
    ck.wait()
    ck.close()


DAMAGE = {
    "flipped params bytes": flip_params_data,
    "truncated params data": truncate("params data"),
    "truncated optimizer metadata": truncate("opt_state/_METADATA"),
    "truncated json part": truncate("extra/metadata"),
    "truncated iterator state": truncate("data_iterator/process_0-of-1.json"),
    "empty step folder": empty_folder,
}


def restore_latest(workdir):
    ck = Checkpointer(workdir, async_save=False)
    try:
        return ck.restore_latest(*trees(0)), ck
    finally:
        ck.close()


def assert_restored(got, step):
    params, opt, got_step, rng, data, meta = got
    want_params, want_opt = trees(step)
    assert got_step == step and data == {"epoch": step, "b": b"\x00\x01"} and meta == {"trainable": ["x"]}
    for a, b in zip(jax.tree.leaves((params, opt)), jax.tree.leaves((want_params, want_opt))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(step)))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_falls_back_to_the_newest_intact_step(tmp_path, damage, caplog):
    save_steps(tmp_path)
    where = DAMAGE[damage](tmp_path / "checkpoints" / "6")
    with caplog.at_level(logging.INFO, logger="llava_jax"):
        got, ck = restore_latest(tmp_path)
    assert_restored(got, 3)
    lines = [r.getMessage() for r in caplog.records]
    report = [x for x in lines if "step 6 is damaged" in x]
    assert len(report) == 1 and "\n" not in report[0], lines
    assert f"checkpoints/6/{where}" in report[0] or (where == "6" and "checkpoints/6" in report[0]), report
    assert any("resuming from step 3" in x for x in lines), lines
    # the damaged step is kept for inspection but no longer counts as a checkpoint
    assert (tmp_path / "checkpoints" / "6.damaged").is_dir()
    assert Checkpointer(tmp_path, async_save=False).latest_step() == 3


def test_a_read_finishing_after_orbax_closed_its_loop_stays_quiet(monkeypatch):
    """The race behind a flaky CI run: a TensorStore read Orbax stopped awaiting completes after
    Orbax closed its event loop (TensorStore's callback hits `call_soon_threadsafe` on the
    closed loop). Made here with a real TensorStore future; it must be dropped, while any
    other unraisable exception still reaches the hook."""
    import asyncio
    import sys

    import tensorstore as ts

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.setattr(integrity, "_late_filter_installed", False)
    with integrity.quiet_failed_reads():
        pass  # the late-completion filter stays after the restore

    promise, future = ts.Promise.new()

    async def wait():
        await future

    loop = asyncio.new_event_loop()
    task = loop.create_task(wait())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    promise.set_result(1)  # TensorStore calls back into the closed loop

    class Noisy:
        def __del__(self):
            raise RuntimeError("Event loop is closed")  # same text, not TensorStore's: reported

    Noisy()
    assert len(seen) == 1 and "Noisy.__del__" in repr(seen[0].object), [repr(u.object) for u in seen]
    del task


def test_damage_found_after_a_resume_does_not_block_the_next_save(tmp_path):
    """The run that fell back saves the same step again: the damaged folder is out of the way."""
    save_steps(tmp_path)
    flip_params_data(tmp_path / "checkpoints" / "6")
    got, _ = restore_latest(tmp_path)
    assert got[2] == 3
    save_steps(tmp_path, steps=(6,))
    got, _ = restore_latest(tmp_path)
    assert_restored(got, 6)


def test_every_step_damaged_is_one_error_line(tmp_path):
    save_steps(tmp_path)
    flip_params_data(tmp_path / "checkpoints" / "6")
    truncate("opt_state/_METADATA")(tmp_path / "checkpoints" / "3")
    with pytest.raises(CheckpointError) as e:
        restore_latest(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 1000, msg
    assert "step 6" in msg and "checkpoints/6/params" in msg, msg
    assert "step 3" in msg and "checkpoints/3/opt_state/_METADATA" in msg, msg
    # nothing is moved while no step can be used: the user decides
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]


def test_no_checkpoint_is_no_resume(tmp_path):
    got, _ = restore_latest(tmp_path)
    assert got is None


def test_checkpoint_written_before_checksums_still_restores(tmp_path):
    """The layout of the checkpoints of earlier versions: the same three items, no checksums in
    the JSON part. They are restored unverified (only what Orbax itself checks)."""
    params, opt = trees(4)
    mgr = ocp.CheckpointManager(tmp_path / "checkpoints", options=ocp.CheckpointManagerOptions(create=True))
    extra = {"step": 4, "rng": np.asarray(jax.random.key_data(jax.random.key(4))).tolist(),
             "data": {"epoch": 4, "b": {"__bytes__": "0001"}}, "meta": {"trainable": ["x"]}}
    mgr.save(4, args=ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt),
                                        extra=ocp.args.JsonSave(extra)))
    mgr.wait_until_finished()
    mgr.close()
    got, _ = restore_latest(tmp_path)
    assert_restored(got, 4)


def test_params_only_restore_checks_the_checksums(tmp_path):
    """`restore_params` (a previous stage's workdir, an export) refuses a damaged step with the
    same one-line error instead of loading changed weights."""
    save_steps(tmp_path, steps=(3,), async_save=False)
    flip_params_data(tmp_path / "checkpoints" / "3")
    ck = Checkpointer(tmp_path, async_save=False)
    with pytest.raises(CheckpointError, match=r"step 3 is damaged: .*checkpoints/3/params"):
        ck.restore_params(3, trees(0)[0])
    ck.close()


def test_changed_iterator_state_is_named(tmp_path):
    """An iterator state file that still parses but holds other values fails its checksum."""
    save_steps(tmp_path, async_save=False)
    f = tmp_path / "checkpoints" / "6" / "data_iterator" / "process_0-of-1.json"
    f.write_text(f.read_text().replace('"epoch": 6', '"epoch": 5'))
    with pytest.raises(CheckpointError, match=r"step 6 is damaged: .*checkpoints/6/data_iterator/process_0-of-1.json: "
                                              r"the input iterator state does not match"):
        Checkpointer(tmp_path, async_save=False).restore(6, *trees(0))
    got, _ = restore_latest(tmp_path)
    assert_restored(got, 3)


def old_layout_save(workdir, step, data, checksums=True):
    """A step as the versions before Grain's handler wrote it: three items, the iterator
    state(s) inside the JSON part (bytes tagged), with or without checksums."""
    params, opt = trees(step)
    mgr = ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(create=True))
    extra = {"step": step, "rng": np.asarray(jax.random.key_data(jax.random.key(step))).tolist(),
             "data": data, "meta": {"trainable": ["x"]}}
    if checksums:
        extra["integrity"] = {"params": integrity.tree_checksums(params),
                              "opt_state": integrity.tree_checksums(opt), "json": integrity.json_digest(extra)}
    mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt),
                                           extra=ocp.args.JsonSave(extra)))
    mgr.wait_until_finished()
    mgr.close()


def test_checkpoint_with_the_iterator_state_in_the_json_part_still_restores(tmp_path):
    old_layout_save(tmp_path, 5, {"epoch": 5, "b": {"__bytes__": "0001"}})
    assert not (tmp_path / "checkpoints" / "5" / "data_iterator").exists()
    got, _ = restore_latest(tmp_path)
    assert_restored(got, 5)
    # a run resumed from it saves the new layout next to it
    save_steps(tmp_path, steps=(6,))
    assert (tmp_path / "checkpoints" / "6" / "data_iterator" / "process_0-of-1.json").is_file()
    got, _ = restore_latest(tmp_path)
    assert_restored(got, 6)


def test_another_process_count_is_refused(tmp_path):
    """Each process restores its own input shard's state: both layouts refuse another count."""
    old_layout_save(tmp_path / "old", 5, {"per_process": [{"epoch": 5}, {"epoch": 5}], "process_count": 2})
    with pytest.raises(ValueError, match=r"state of 2 process\(es\), this run has 1"):
        restore_latest(tmp_path / "old")
    # the new layout: Grain's files of two processes
    params, opt = trees(5)
    mgr = ocp.CheckpointManager(tmp_path / "new" / "checkpoints", options=ocp.CheckpointManagerOptions(create=True))
    extra = {"step": 5, "rng": np.asarray(jax.random.key_data(jax.random.key(5))).tolist(),
             "data_iterator": {"process_count": 2}, "meta": {}}
    mgr.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt),
                                        extra=ocp.args.JsonSave(extra)))
    mgr.wait_until_finished()
    mgr.close()
    for i in range(2):
        (tmp_path / "new" / "checkpoints" / "5" / "data_iterator").mkdir(exist_ok=True)
        (tmp_path / "new" / "checkpoints" / "5" / "data_iterator" / f"process_{i}-of-2.json").write_text("{}")
    with pytest.raises(ValueError, match=r"state of 2 process\(es\), this run has 1"):
        restore_latest(tmp_path / "new")


def test_iterator_state_file_is_grains_own(tmp_path):
    """The data_iterator item is Grain's: Grain's handler restores a real Grain iterator from it."""
    import grain

    ds = grain.MapDataset.range(10).to_iter_dataset()
    it = iter(ds)
    [next(it) for _ in range(3)]
    params, opt = trees(1)
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(1, params, opt, jax.random.key(1), data_state=it.get_state())
    ck.close()
    fresh = iter(ds)
    mgr = ocp.CheckpointManager(tmp_path / "checkpoints")
    mgr.restore(1, args=ocp.args.Composite(data_iterator=grain.checkpoint.CheckpointRestore(fresh)))
    mgr.close()
    assert next(fresh) == 3
    assert json.loads((tmp_path / "checkpoints" / "1" / "data_iterator" / "process_0-of-1.json").read_text()) \
        == it.get_state()
