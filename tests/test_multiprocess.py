"""Multi-host on one machine: 2 CPU processes (2 devices each) joined by `jax.distributed` on
127.0.0.1 with JAX's CPU collectives (gloo) train the tiny config on one 4-device mesh that spans
both processes. Each process reads its own input shard; the global batch is assembled from the
process-local rows. Both are SIGKILLed mid-run, restarted with the same command, and the losses
match a single-process 4-device run of the same config."""
import os
import shutil
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


def start_all(world, workdir, logdir, tag, config="tiny_stage1", args=ARGS):
    port = free_port()
    procs = []
    for rank in range(NPROC):
        log = open(logdir / f"{tag}.{rank}.log", "w")
        procs.append(subprocess.Popen(cmd(world, workdir, config, *args), env=proc_env(LOCAL_DEVICES, rank, port, logdir / "jax-cache"),
                                      cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    return procs


def run_single_process(world, workdir, config="tiny_stage1", args=ARGS):
    """The reference: one process holding the same 4-device mesh."""
    p = subprocess.run(cmd(world, workdir, config, *args), env=proc_env(NPROC * LOCAL_DEVICES), cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]


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
    ref = tmp_path / "ref"
    run_single_process(world, ref)

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
    args = ["--config.data.pack=False", "--config.train.num_steps=200", "--config.train.ckpt_every=1000"]
    w = tmp_path / "mp"
    procs = start_all(world, w, tmp_path, "sig", args=args)
    assert wait_for_steps(procs[0], w, 3, timeout=900)
    procs[1].send_signal(signal.SIGTERM)
    wait_all(procs, tmp_path, "sig")
    import json

    summary = json.loads((w / "train_summary.json").read_text())
    assert summary["status"].startswith("preempted") and summary["step"] < 200
    saved_steps = sorted(int(x.name) for x in (w / "checkpoints").iterdir() if x.name.isdigit())
    assert saved_steps == [summary["step"]]


# LoRA stage 2 with the adapters sharded over an fsdp axis that spans both processes (rank 8
# over fsdp 4: `lora_rank` -> fsdp in the rules table); lr 1e-2 so the adapters move visibly.
# Dropout off: its masks follow the global row, and a sample's row differs between one process
# (rows 0..7 = samples 0..7) and two (process 0's samples 0, 2, 4, 6 first), so the losses would
# differ by the masks (~1e-4), not by anything multi-host.
LORA_ARGS = ["--config.data.pack=False", "--config.train.num_steps=6", "--config.train.ckpt_every=2",
             "--config.optim.lr=1e-2", "--config.model.lora.dropout=0.0", "--config.train.mesh.data=1",
             "--config.train.mesh.fsdp=-1"]


def _fresh_frozen_digest(world, base_quant: str) -> str:
    """The frozen params of the LoRA config built afresh in this process (one device), as the
    trainer's summary digests them (`integrity.tree_checksums`: the same on any mesh)."""
    import jax

    from llava_jax import build
    from llava_jax import sharding as shd
    from llava_jax.demo.run import load_demo_config
    from llava_jax import integrity
    from llava_jax.train_step import split_model

    config = load_demo_config("tiny_stage2_lora")
    config.tokenizer_path, config.model.base_quant = str(world / "tok"), base_quant
    tok, ids = build.tokenizer(config)
    model = build.model(config, shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]), ids, vocab_size=len(tok))
    frozen = build.frozen_for_training(split_model(model, list(config.trainable))[2], config)
    return integrity.json_digest(integrity.tree_checksums(frozen))


@pytest.mark.slow  # five trainer runs (two of them 2-process) per case: minutes on 2 busy cores
@pytest.mark.parametrize("base_quant", ["none", "int8"])
def test_lora_on_two_processes_matches_one_and_resumes(world, tmp_path, base_quant):
    """LoRA (and QLoRA int8) over 2 processes, fsdp across them: the losses equal a
    single-process run of the same config; the frozen base (the whole LLM, the tower) comes out
    bit-identical to a fresh build of it; the checkpoints hold the adapters (and the projector)
    only, and a restore from step 4 gives the uninterrupted run's steps 5 and 6."""
    import json

    from llava_jax.checkpoint import Checkpointer

    args = LORA_ARGS + [f"--config.model.base_quant={base_quant}"]
    fresh = _fresh_frozen_digest(world, base_quant)
    ref = tmp_path / "ref"
    run_single_process(world, ref, "tiny_stage2_lora", args)
    w = tmp_path / "mp"
    wait_all(start_all(world, w, tmp_path, "first", "tiny_stage2_lora", args), tmp_path, "first")
    log0 = (tmp_path / "first.0.log").read_text()
    assert "process 0 of 2, 2 local / 4 global devices" in log0 and "'fsdp': 4" in log0

    r, g = losses(ref), losses(w)
    assert sorted(g) == sorted(r) == list(range(1, 7)) and g[6] < g[1]
    np.testing.assert_allclose([g[s] for s in range(1, 7)], [r[s] for s in range(1, 7)], rtol=2e-5)
    summary = json.loads((w / "train_summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["frozen_digest"] == json.loads((ref / "train_summary.json").read_text())["frozen_digest"]
    assert summary["frozen_digest"] == fresh

    ck = Checkpointer(w)
    saved = set(ck.extra(4)["integrity"]["params"])
    ck.close()
    assert {f"llm/layers/lora/{n}_{ab}" for n in ("q", "k", "v", "o", "gate", "up", "down") for ab in "ab"} <= saved
    assert all("/lora/" in p or p.startswith("projector/") for p in saved), sorted(saved)

    # restore: drop step 6 and its metrics, rerun the same command on 2 processes
    shutil.rmtree(w / "checkpoints" / "6")
    metrics = (w / "metrics.jsonl").read_text().splitlines()
    (w / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics if json.loads(line)["step"] <= 4))
    wait_all(start_all(world, w, tmp_path, "second", "tiny_stage2_lora", args), tmp_path, "second")
    assert "resumed from" in (tmp_path / "second.0.log").read_text()
    g = losses(w)
    np.testing.assert_allclose([g[5], g[6]], [r[5], r[6]], rtol=2e-5)
    summary = json.loads((w / "train_summary.json").read_text())
    assert summary["step"] == 6 and summary["frozen_digest"] == fresh
