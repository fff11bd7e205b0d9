"""The trainer end to end, as users run it (`python -m llava_jax.train ...` in a subprocess):
SIGKILL mid-run + restart resumes with exactly the uninterrupted losses; SIGTERM saves and
exits; a different mesh shape restores; a non-finite loss stops and keeps the last good
checkpoint; stage 2 starts from stage 1's workdir; the export loads in transformers."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from llava_jax.demo import dataset
    from llava_jax.data.tokenizer_build import build_llama_tokenizer
    from llava_jax.demo.run import SYSTEM, corpus

    root = tmp_path_factory.mktemp("world")
    dataset.generate(root / "data", num_train=48, num_eval=4, seed=0, image_size=16)
    build_llama_tokenizer(corpus(root / "data") + [SYSTEM], root / "tok", vocab_size=400)
    return root


def cmd(world, workdir, config="tiny_stage1", *extra):
    rows = "stage1.json" if config.endswith("stage1") else "stage2.json"
    return [sys.executable, "-m", "llava_jax.train", f"--config={REPO}/configs/demo.py:{config}",
            f"--workdir={workdir}", f"--config.tokenizer_path={world / 'tok'}",
            f"--config.data.sources={world / 'data' / rows}", f"--config.data.image_folder={world / 'data' / 'images'}",
            *extra]


def env():
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    e["JAX_PLATFORMS"] = "cpu"
    return e


def run(args, timeout=300):
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)
    if p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def losses(workdir) -> dict[int, float]:
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]  # a resumed run rewrites the steps after its checkpoint
    return out


def wait_for_steps(proc, workdir, n, timeout=240):
    t0 = time.time()
    path = Path(workdir) / "metrics.jsonl"
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return True
        time.sleep(0.02)
    return False


def run_and_sigkill(args, workdir, after_steps: int) -> None:
    """Start a training command and SIGKILL it once `after_steps` steps are logged."""
    proc = subprocess.Popen(args, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_steps(proc, workdir, after_steps), "run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


STEPS = ["--config.train.num_steps=24", "--config.train.ckpt_every=3"]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    w = tmp_path_factory.mktemp("ref")
    run(cmd(world, w, "tiny_stage1", *STEPS))
    return w


def test_sigkill_then_restart_gives_the_uninterrupted_losses(world, reference, tmp_path):
    ref = losses(reference)
    assert sorted(ref) == list(range(1, 25))
    w = tmp_path / "run"
    run_and_sigkill(cmd(world, w, "tiny_stage1", *STEPS), w, 10)
    killed_at = max(losses(w))
    assert killed_at < 24
    run(cmd(world, w, "tiny_stage1", *STEPS))  # the same command resumes
    got = losses(w)
    assert sorted(got) == list(range(1, 25))
    assert [got[s] for s in range(1, 25)] == [ref[s] for s in range(1, 25)]  # exactly equal
    summary = json.loads((w / "train_summary.json").read_text())
    assert summary["status"] == "completed"


def test_sigterm_saves_and_exits_then_resumes(world, reference, tmp_path):
    ref = losses(reference)
    w = tmp_path / "run"
    proc = subprocess.Popen(cmd(world, w, "tiny_stage1", *STEPS, "--config.train.ckpt_every=1000"),
                            env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_steps(proc, w, 5), "run ended before SIGTERM"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    summary = json.loads((w / "train_summary.json").read_text())
    assert summary["status"].startswith("preempted")
    saved = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [summary["step"]]  # saved at the step it stopped, though ckpt_every is 1000
    run(cmd(world, w, "tiny_stage1", *STEPS, "--config.train.ckpt_every=1000"))
    got = losses(w)
    assert [got[s] for s in range(1, 25)] == [ref[s] for s in range(1, 25)]


@pytest.mark.slow  # CI time (47 s)
def test_run_that_runs_out_of_data_reports_saves_and_logs_its_real_last_step(world, tmp_path):
    """An epoch-bounded run (`num_steps=-1`) ends at "data exhausted" on a step log_every does
    not divide: the summary, the final checkpoint and the metrics log all name that step (the
    summary used to report the last *logged* step), and the same command again trains nothing."""
    w = tmp_path / "run"
    args = cmd(world, w, "tiny_stage1", "--config.train.num_steps=-1", "--config.data.num_epochs=3",
               "--config.train.log_every=4", "--config.train.ckpt_every=1000")
    run(args)
    summary = json.loads((w / "train_summary.json").read_text())
    assert summary["status"] == "data exhausted"
    end = summary["step"]
    assert end > 4 and end % 4 != 0, "pick log_every so a step is logged before the last one"
    saved = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [end]
    logged = [json.loads(x)["step"] for x in (w / "metrics.jsonl").read_text().splitlines()]
    assert logged == [*range(4, end, 4), end]
    assert summary["loss"] == losses(w)[end]
    run(args)  # resumes at the end: no more steps, nothing rewritten
    again = json.loads((w / "train_summary.json").read_text())
    assert again["status"] == "data exhausted" and again["step"] == end
    assert [json.loads(x)["step"] for x in (w / "metrics.jsonl").read_text().splitlines()] == logged


@pytest.mark.slow  # 48 s on 2 cores (CI time); test_perf_levers checks each lever's step in CI
def test_memory_levers_train_like_the_default_path(world, tmp_path):
    """`model.loss_chunk` + `model.cast_frozen` in a bf16 stage-2 run: the same losses as the run
    without them (chunked loss: equal up to summation order; bf16 frozen params: every use casts
    them to bf16 anyway). That the options reach the model and the step is
    `test_perf_levers.py::test_trainer_config_turns_the_memory_levers_on`."""
    base = ["--config.train.num_steps=4", "--config.train.ckpt_every=100", "--config.model.dtype=bfloat16"]
    run(cmd(world, tmp_path / "ref", "tiny_stage2", *base))
    run(cmd(world, tmp_path / "lev", "tiny_stage2", *base, "--config.model.loss_chunk=16",
            "--config.model.cast_frozen=True"))
    ref, got = losses(tmp_path / "ref"), losses(tmp_path / "lev")
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [ref[s] for s in range(1, 5)], rtol=1e-5)


@pytest.mark.slow  # CI time (54 s): resharding on resume; the kill/damage resume tests stay in CI
def test_resume_on_a_different_mesh(world, tmp_path):
    a = ["--config.train.num_steps=8", "--config.train.ckpt_every=4"]
    ref = tmp_path / "ref"
    run(cmd(world, ref, "tiny_stage2", *a, "--config.train.mesh.data=4", "--config.train.mesh.fsdp=2"))
    w = tmp_path / "run"
    run(cmd(world, w, "tiny_stage2", "--config.train.num_steps=8", "--config.train.ckpt_every=4",
            "--config.train.mesh.data=4", "--config.train.mesh.fsdp=2", "--config.train.keep=1"))
    # keep only the step-4 checkpoint and its metrics, then resume on a (1, 4, 2) mesh
    import shutil

    shutil.rmtree(w / "checkpoints" / "8")
    lines = (w / "metrics.jsonl").read_text().splitlines()[:4]
    (w / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run(cmd(world, w, "tiny_stage2", *a, "--config.train.mesh.data=1", "--config.train.mesh.fsdp=4",
            "--config.train.mesh.tensor=2"))
    r, g = losses(ref), losses(w)
    np.testing.assert_allclose([g[s] for s in range(5, 9)], [r[s] for s in range(5, 9)], rtol=1e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(world, tmp_path):
    w = tmp_path / "nan"
    p = subprocess.run(cmd(world, w, "tiny_stage1", "--config.train.num_steps=20", "--config.train.ckpt_every=1",
                           "--config.optim.lr=1e30", "--config.optim.grad_clip=0", "--config.optim.warmup_steps=0"),
                       capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
    assert p.returncode != 0
    assert "stopping without saving this state" in p.stderr
    summary_steps = sorted(int(x.name) for x in (w / "checkpoints").iterdir() if x.name.isdigit())
    bad_step = max(losses(w)) if (w / "metrics.jsonl").exists() and losses(w) else None
    # every kept checkpoint precedes the non-finite step
    assert summary_steps and all(s < 20 for s in summary_steps)
    if bad_step is not None:
        assert all(np.isfinite(v) for s, v in losses(w).items())


def test_damaged_latest_checkpoint_resumes_from_the_one_before(world, tmp_path):
    """Flipped bytes in the newest params used to resume silently from the garbage (exit 0);
    now the step is reported in one line, the run resumes from the step before and trains the
    same losses again. With every step damaged: one error line, exit 1."""
    from train_util import flip_params_data, truncate

    w = tmp_path / "run"
    args = cmd(world, w, "tiny_stage1", "--config.train.num_steps=6", "--config.train.ckpt_every=3")
    run(args)
    ref = losses(w)
    flip_params_data(w / "checkpoints" / "6")
    p = run(args)
    report = [x for x in p.stderr.splitlines() if "step 6 is damaged" in x]
    assert len(report) == 1 and "checkpoints/6/params" in report[0], p.stderr[-3000:]
    assert "resuming from step 3" in p.stderr, p.stderr[-3000:]
    got = losses(w)
    assert [got[s] for s in range(1, 7)] == [ref[s] for s in range(1, 7)]
    # every step damaged: nothing to resume from
    flip_params_data(w / "checkpoints" / "6")
    truncate("opt_state/_METADATA")(w / "checkpoints" / "3")
    bad = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
    assert bad.returncode == 1, bad.stderr[-3000:]
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "step 6" in last and "checkpoints/3/opt_state/_METADATA" in last, last
    assert "Traceback" not in bad.stderr, bad.stderr[-3000:]


def test_empty_dataset_is_one_error_line_before_training(world, tmp_path):
    """A data file with no rows used to end with exit 0 and nothing trained."""
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    w = tmp_path / "run"
    args = [a if not a.startswith("--config.data.sources=") else f"--config.data.sources={empty}"
            for a in cmd(world, w, "tiny_stage1")]
    p = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
    assert p.returncode == 1, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the training data has no rows") and str(empty) in last, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and not (w / "checkpoints").exists() and not (w / "metrics.jsonl").exists()


def test_nearly_all_bad_data_trains_and_all_bad_data_stops(world, tmp_path):
    """1 usable row in 51 trains (the skips are counted and reported at the end); the same
    rows without the usable one stop with one error line (they used to end with exit 0)."""
    rows = json.loads((world / "data" / "stage1.json").read_text())
    bad = [{**rows[0], "id": f"bad{i}", "image": f"missing_{i}.png"} for i in range(50)]
    (tmp_path / "mixed.json").write_text(json.dumps([rows[0]] + bad))
    (tmp_path / "bad.json").write_text(json.dumps(bad))

    def args(data, *extra):
        return [a if not a.startswith("--config.data.sources=") else f"--config.data.sources={tmp_path / data}"
                for a in cmd(world, tmp_path / data.removesuffix(".json"), "tiny_stage1", *extra)]

    p = run(args("mixed.json", "--config.train.num_steps=2"))
    assert json.loads((tmp_path / "mixed" / "train_summary.json").read_text())["status"] == "completed"
    report = [x for x in p.stderr.splitlines() if "rows: image_missing" in x]
    assert len(report) == 1 and int(report[0].split("skipped ")[1].split()[0]) >= 100, p.stderr[-3000:]
    bad = subprocess.run(args("bad.json", "--config.data.num_epochs=1"), capture_output=True, text=True,
                         timeout=300, env=env(), cwd=REPO)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no usable sample in 50 rows: every record is being skipped"), last


def test_stage2_from_stage1_workdir_and_export_loads_in_transformers(world, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import LlavaForConditionalGeneration

    s1, s2, hf = tmp_path / "s1", tmp_path / "s2", tmp_path / "hf"
    run(cmd(world, s1, "tiny_stage1", "--config.train.num_steps=2"))
    run(cmd(world, s2, "tiny_stage2", "--config.train.num_steps=2", f"--config.model.init_from_workdir={s1}"))
    # (the tiny configs train on top of a seeded random vision tower that no checkpoint holds)
    run([sys.executable, "-m", "llava_jax.export", f"--config={REPO}/configs/demo.py:tiny_stage2",
         f"--workdir={s2}", f"--out={hf}", f"--config.tokenizer_path={world / 'tok'}",
         f"--config.model.init_from_workdir={s1}", "--allow_random_init"])
    model, info = LlavaForConditionalGeneration.from_pretrained(hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    import llava_jax

    ours = llava_jax.from_pretrained(hf)
    cfg = ours.config
    t = cfg.num_image_tokens
    ids = np.array([[1] + [cfg.image_token_id] * t + [5, 6, 7]])
    px = np.random.default_rng(0).normal(size=(1, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px)).logits.numpy()
    assert np.abs(np.asarray(ours(ids, pixel_values=px)) - ref).max() < 1e-4
    # stage 2 on top of stage 1, exported with its tokenizer
    from llava_jax.convert.safetensors_io import SafetensorsFile

    assert (hf / "tokenizer_config.json").exists()
    assert SafetensorsFile(hf / "model.safetensors").keys()
