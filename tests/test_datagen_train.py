"""Generated instruction rows are real training data: the shapes world's captions + boxes go
through the datagen CLI (`--backend template`), the rows load through the Grain pipeline with
nothing skipped, and (slow: ~1 min of XLA compiles on 2 cores) `python -m llava_jax.train` runs a
few steps of the tiny stage-2 config on them."""
import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    from llava_jax.demo import dataset
    from llava_jax.data.tokenizer_build import build_llama_tokenizer
    from llava_jax.demo.run import SYSTEM

    root = tmp_path_factory.mktemp("dg")
    dataset.generate(root / "world", num_train=24, num_eval=0, seed=0, image_size=16)
    from llava_jax.datagen.__main__ import main

    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["--annotations", str(root / "world" / "annotations.jsonl"), "--backend", "template",
                     "--out", str(root / "gen"), "--no-progress"]) == 0
    lines = out.getvalue()
    assert "72 generated, 0 rejected, 0 failed" in lines, lines
    rows = json.loads((root / "gen" / "llava_instruct.json").read_text())
    texts = [SYSTEM + " USER: ASSISTANT:"] * 200 + [t["value"] for r in rows for t in r["conversations"]]
    build_llama_tokenizer(texts, root / "tok", vocab_size=600)
    return root, rows


def test_generated_rows_load_through_the_pipeline(generated):
    from transformers import AutoTokenizer

    from llava_jax.data.pipeline import make_iterator
    from llava_jax.data.pipeline_config import PipelineConfig
    from llava_jax.data.sources import LlavaJsonSource
    from llava_jax.data.tokenize import add_llava_special_tokens

    root, rows = generated
    assert len(rows) == 72 and {r["id"].rsplit("_", 1)[1] for r in rows} == {"conversation", "detail", "complex"}
    tok = AutoTokenizer.from_pretrained(root / "tok")
    add_llava_special_tokens(tok)
    src = LlavaJsonSource(root / "gen" / "llava_instruct.json", root / "world" / "images")
    cfg = PipelineConfig(max_length=512, max_images_per_row=4, image_size=16, num_image_tokens=4,
                         template="vicuna_v1", batch_size=4, shuffle=False, num_epochs=1, drop_remainder=False,
                         prefetch_batches=0)
    it = make_iterator(src, tok, cfg, 0, 1)
    batches = list(it)
    last = batches[-1]["stats"]
    assert int(last["total/samples"]) == 72 and int(last["total/skipped"]) == 0
    assert sum(int(b["stats"]["num_images"]) for b in batches) == 72
    assert sum(int(b["stats"]["num_target_tokens"]) for b in batches) > 72 * 10


@pytest.mark.slow
def test_generated_rows_train_a_few_steps(generated, tmp_path):
    root, _ = generated
    w = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [sys.executable, "-m", "llava_jax.train", f"--config={REPO}/configs/demo.py:tiny_stage2", f"--workdir={w}",
         f"--config.tokenizer_path={root / 'tok'}", f"--config.data.sources={root / 'gen' / 'llava_instruct.json'}",
         f"--config.data.image_folder={root / 'world' / 'images'}", "--config.train.num_steps=3",
         "--config.train.per_device_batch=4", "--config.train.global_batch=4", "--config.train.ckpt_every=100",
         "--config.optim.lr=3e-3"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    s = json.loads((w / "train_summary.json").read_text())
    assert s["status"] == "completed" and s["step"] == 3
    metrics = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in metrics)
    assert all(m["supervised_tokens"] > 0 for m in metrics)
    assert metrics[-1].get("skipped", 0) == 0
