"""The original LLaVA's preprocessing as a test reference (see ``original_llava_runner.py``).

``original_env()`` installs the original package and its pinned tokenizer stack with
``pip install --target`` into a cache folder once (about 15 s, ~60 MB; ``$LLAVA_JAX_REF_CACHE``
or ``~/.cache/llava_jax/original_llava``) and skips the calling test, saying why, when that is
impossible (no registry). ``run_original(...)`` runs the rows through it in a subprocess; torch
comes from the test environment (the original imports it; its tokenization does not use it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# haotian-liu/LLaVA's last commit (c121f04) pins these; llava-torch 1.2.2.post1 on PyPI is that
# code. huggingface-hub: what tokenizers 0.15 / transformers 4.37 import (<1.0).
PINS = ("llava-torch==1.2.2.post1", "transformers==4.37.2", "tokenizers==0.15.1",
        "sentencepiece==0.1.99", "huggingface-hub==0.20.3")
RUNNER = Path(__file__).with_name("original_llava_runner.py")


def original_env() -> Path:
    root = Path(os.environ.get("LLAVA_JAX_REF_CACHE", Path.home() / ".cache" / "llava_jax" / "original_llava"))
    target = root / "-".join(p.replace("==", "") for p in PINS[:2])
    done = target / ".complete"
    if done.is_file():
        return target
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *PINS]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"could not install the original LLaVA reference ({' '.join(PINS)}): {e}")
    if proc.returncode != 0:
        pytest.skip(f"could not install the original LLaVA reference ({' '.join(PINS)}): "
                    f"{proc.stderr.strip()[-500:]}")
    done.write_text("\n".join(PINS) + "\n")
    return target


def run_original(tokenizer_dir, version: str, rows: list, **mode) -> dict:
    """The original's (input_ids, labels, mismatch) for each row (LLaVA ``conversations`` lists);
    with ``mode="prompts"`` its rendered prompt text (see original_llava_runner.py)."""
    env = dict(os.environ, PYTHONPATH=str(original_env()), TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    req = json.dumps({"tokenizer_dir": str(tokenizer_dir), "version": version, "rows": rows, **mode})
    proc = subprocess.run([sys.executable, str(RUNNER)], input=req, capture_output=True, text=True,
                          env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"the original LLaVA reference failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)
