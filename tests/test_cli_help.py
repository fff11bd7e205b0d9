"""Every entry point's --help: exit 0, the command's own usage and flags, nothing stale."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def help_of(module: str) -> str:
    p = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO, env=ENV,
                       timeout=300)
    assert p.returncode == 0, (module, p.returncode, p.stderr[-2000:])
    return p.stdout


@pytest.mark.parametrize("module,must", [
    ("llava_jax.train", ["python -m llava_jax.train --config=", "--config:", "--workdir:", "--config.<group>.<field>",
                         "--[no]verbose"]),
    ("llava_jax.export", ["--workdir:", "--out:", "--allow_random_init", "run_config.json", "--adapter:",
                          "--[no]merge"]),
    ("llava_jax.demo", ["--out:", "--seed:", "exports the model"]),
    ("llava_jax.tools.aot", ["--topology:", "--config:"]),
    ("llava_jax.serve", ["--model", "--warmup", "--template", "--adapter", "--adapter-unmerged"]),
    ("llava_jax.chat", ["--model", "--adapter", "in-chat commands:", "/image PATH", "/reset", "/help", "/quit"]),
    ("llava_jax.eval.answer", ["--model", "--workdir", "--questions", "--verbose"]),
    ("llava_jax.datagen", ["--annotations", "--types", "(default: conversation,detail,complex)"]),
])
def test_help_exits_0_and_shows_the_commands_flags(module, must):
    text = help_of(module)
    missing = [m for m in must if m not in text]
    assert not missing, (module, missing, text[:3000])
    assert "--step" not in text  # export never had one; no stale flags anywhere
    assert "(default: None)" not in text
    for line in text.splitlines():  # each default shown once
        assert line.count("(default:") <= 1, line


@pytest.mark.parametrize("module", ["llava_jax.chat", "llava_jax.serve"])
def test_a_model_that_cannot_be_opened_is_one_error_line(module, tmp_path):
    (tmp_path / "data").mkdir()
    for model in (tmp_path / "missing", tmp_path / "data"):
        p = subprocess.run([sys.executable, "-m", module, "--model", str(model)], capture_output=True, text=True,
                           cwd=REPO, env=ENV, timeout=300, input="")
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert p.stderr.strip().splitlines()[-1].startswith(f"error: cannot open {model}")
