"""The README's main command, shrunk (few images, one epoch per stage): every stage runs through
the real entry point and the summary has every question type. Slow: run with `-m slow`. The
full-size accuracy is measured by running the demo itself (figures in the issue notes/README)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, "-m", "llava_jax.demo", f"--out={tmp_path / 'demo'}", "--num_train=64",
                        "--num_eval=10", "--stage1_epochs=1", "--stage2_epochs=1", "--tower_steps=10"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr[-4000:]
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    cats = {r["category"] for r in summary["accuracy"]}
    assert cats == {"color", "shape", "count", "position", "existence"}, cats
    assert all(0 <= r["accuracy"] <= 1 and 0 < r["chance"] < 1 for r in summary["accuracy"])
    assert {"tower", "stage1", "stage2", "eval", "total"} <= set(summary["times_s"])
    assert "held-out accuracy" in p.stdout and "brand-new images" in p.stdout
