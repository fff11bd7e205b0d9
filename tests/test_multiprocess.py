"""Multi-host on one machine: 2 CPU processes (2 devices each) joined by `jax.distributed` on
127.0.0.1 with JAX's CPU collectives (gloo) train the tiny config on one 4-device mesh that spans
both processes. Each process reads its own input shard; the global batch is assembled from the
process-local rows. Both are SIGKILLed mid-run, restarted with the same command, and the losses
match a single-process 4-device run of the same config."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_trainer import REPO, cmd, losses, wait_for_steps, world  # noqa: F401 - world is a fixture

# pack=False: one sample per row, so a global batch holds the same samples whether one process
# reads them all or two processes read alternate samples (shards are ds[i::n]).
ARGS = ["--config.data.pack=False", "--config.train.num_steps=6", "--config.train.ckpt_every=2"]
NPROC, LOCAL_DEVICES = 2, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_env(local_devices: int, rank: int | None = None, port: int | None = None, cache=None) -> dict:
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    e["JAX_PLATFORMS"] = "cpu"
    if cache is not None:  # the restart reuses the first start's compiled programs
        e.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "LLAVA_JAX_DISTRIBUTED"):
        e.pop(k, None)
    if rank is not None:
        e.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(NPROC), JAX_PROCESS_ID=str(rank))
    return e


def start_all(world, workdir, logdir, tag):
    port = free_port()
    procs = []
    for rank in range(NPROC):
        log = open(logdir / f"{tag}.{rank}.log", "w")
        procs.append(subprocess.Popen(cmd(world, workdir, "tiny_stage1", *ARGS), env=proc_env(LOCAL_DEVICES, rank, port, logdir / "jax-cache"),
                                      cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs, logdir, tag, timeout=900):
    t0 = time.time()
    for rank, p in enumerate(procs):
        try:
            rc = p.wait(timeout=max(1, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            for q in procs:
                q.kill()
            logs = "\n".join((logdir / f"{tag}.{r}.log").read_text()[-3000:] for r in range(NPROC))
            raise AssertionError(f"process {rank} exit {rc}\n{logs}")


def test_two_processes_kill_resume_match_single_process(world, tmp_path):
    # reference: one process, the same 4-device mesh
    ref = tmp_path / "ref"
    p = subprocess.run(cmd(world, ref, "tiny_stage1", *ARGS), env=proc_env(NPROC * LOCAL_DEVICES), cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]

    w = tmp_path / "mp"
    procs = start_all(world, w, tmp_path, "first")
    alive = wait_for_steps(procs[0], w, 4, timeout=900)  # generous: CI boxes are busy
    for q in procs:
        q.send_signal(signal.SIGKILL)
        q.wait()
    assert alive, (tmp_path / "first.0.log").read_text()[-3000:]
    killed_at = max(losses(w))
    assert killed_at < 6

    wait_all(start_all(world, w, tmp_path, "second"), tmp_path, "second")
    log0 = (tmp_path / "second.0.log").read_text()
    assert "process 0 of 2, 2 local / 4 global devices" in log0
    assert "resumed from" in log0  # restarted from a checkpoint, not from scratch
    assert "input shard 0 of 2" in log0
    # only process 0 logs at INFO
    assert "resumed from" not in (tmp_path / "second.1.log").read_text()

    r, g = losses(ref), losses(w)
    assert sorted(g) == sorted(r) == list(range(1, 7))
    np.testing.assert_allclose([g[s] for s in range(1, 7)], [r[s] for s in range(1, 7)], rtol=2e-5)
    steps = sorted(int(x.name) for x in (w / "checkpoints").iterdir() if x.name.isdigit())
    assert steps[-1] == 6
    import json

    assert json.loads((w / "train_summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_sigterm_on_one_host_saves_everywhere_at_one_step(world, tmp_path):
    """Preemption of ONE host (TPU maintenance, spot reclaim): JAX's preemption sync point makes
    both processes save at the same step and exit cleanly."""
    global ARGS
    saved = ARGS
    ARGS = ["--config.data.pack=False", "--config.train.num_steps=200", "--config.train.ckpt_every=1000"]
    try:
        w = tmp_path / "mp"
        procs = start_all(world, w, tmp_path, "sig")
        assert wait_for_steps(procs[0], w, 3, timeout=900)
        procs[1].send_signal(signal.SIGTERM)
        wait_all(procs, tmp_path, "sig")
    finally:
        ARGS = saved
    import json

    summary = json.loads((w / "train_summary.json").read_text())
    assert summary["status"].startswith("preempted") and summary["step"] < 200
    saved_steps = sorted(int(x.name) for x in (w / "checkpoints").iterdir() if x.name.isdigit())
    assert saved_steps == [summary["step"]]
