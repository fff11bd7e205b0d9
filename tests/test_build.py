"""llava_jax.build: a training workdir's model rebuilt from the config the run recorded, and never
exported or served with params that no checkpoint provided."""
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from llava_jax import build
from llava_jax import sharding as shd
from llava_jax.checkpoint import Checkpointer
from llava_jax.train_step import split_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A tower workdir (vision), a stage-1 workdir (projector + llm) and a stage-2 workdir on top of
    both that recorded its config, as the demo makes them; each holds distinct params."""
    from llava_jax.data.tokenizer_build import build_llama_tokenizer
    from llava_jax.demo.run import SYSTEM, load_demo_config

    root = tmp_path_factory.mktemp("stages")
    build_llama_tokenizer([SYSTEM, "What color is the circle? Red."] * 50, root / "tok", vocab_size=300)
    c = load_demo_config("tiny_stage2")
    c.tokenizer_path = str(root / "tok")
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tok, ids = build.tokenizer(c)
    saved = {}
    for k, (name, patterns) in enumerate([("tower", [r"vision/.*"]), ("stage1", [r"projector/.*", r"llm/.*"]),
                                          ("stage2", [r"projector/.*", r"llm/.*"])]):
        c.model.seed = 10 + k  # different random params per stage
        model = build.model(c, mesh, ids, vocab_size=len(tok))
        _, trainable, _ = split_model(model, patterns)
        ck = Checkpointer(root / name, async_save=False)
        ck.save(1, trainable, {"unused": np.zeros((), np.int32)}, jax.random.key(0), meta={"trainable": patterns})
        ck.close()
        saved[name] = {"/".join(map(str, p)): np.asarray(v.value) for p, v in nnx.to_flat_state(trainable)}
    c.model.seed = 0
    c.model.init_from_workdir = f"{root / 'tower'},{root / 'stage1'}"
    build.record_run_config(c, root / "stage2")
    return root, c, saved


def test_trained_model_rebuilds_from_the_recorded_config(stages):
    root, _, saved = stages
    model, tok, config = build.trained_model(root / "stage2")
    got = {"/".join(map(str, p)): np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path, value in got.items():  # every param is the one its stage trained
        want = saved["tower"][path] if path.startswith("vision/") else saved["stage2"][path]
        np.testing.assert_array_equal(value, want, err_msg=path)
    assert config.model.init_from_workdir.endswith("stage1") and len(tok) > 0


def test_a_param_no_checkpoint_provided_is_refused(stages):
    root, c, _ = stages
    bare = c.copy_and_resolve_references()
    bare.model.init_from_workdir = str(root / "stage1")  # the tower workdir forgotten
    with pytest.raises(build.ProvenanceError, match=r"vision/ \(\d+ tensors\).*init_from_workdir"):
        build.trained_model(root / "stage2", bare)
    model, _, _ = build.trained_model(root / "stage2", bare, allow_random_init=True)  # asked for
    assert model is not None


def test_export_cli_needs_no_config_and_refuses_random_params(stages, tmp_path):
    root, _, _ = stages
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "llava_jax.export", f"--workdir={root / 'stage2'}",
                         f"--out={tmp_path / 'hf'}"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer_config.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "llava_jax.export", f"--config={REPO}/configs/demo.py:tiny_stage2",
                          f"--config.tokenizer_path={root / 'tok'}", f"--workdir={root / 'stage2'}",
                          f"--out={tmp_path / 'hf2'}"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert bad.returncode == 1 and "error: no checkpoint provides vision/" in bad.stderr, bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr and not (tmp_path / "hf2").exists()


def test_model_config_names_a_preset_when_the_checkpoints_are_elsewhere():
    from llava_jax.train.defaults import base_config

    c = base_config()
    c.model.llm_path, c.model.clip_path = "/nowhere/vicuna-13b-v1.5", "/nowhere/clip-vit-large-patch14-336"
    cfg = build.model_config(c, vocab_size=32064)
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.vision.num_layers, cfg.num_image_tokens) == (5120, 40, 24, 576)
    c.model.llm_path = "/nowhere/my-llm"
    with pytest.raises(ValueError, match="named preset"):
        build.model_config(c, vocab_size=32064)
    c.model.preset = "llava_1_5_7b"
    assert build.model_config(c, vocab_size=32064).text.hidden_size == 4096


@pytest.mark.slow  # CI time (24 s)
def test_export_refuses_a_folder_holding_a_model_unless_overwrite(stages, tmp_path):
    """Refused before the model is built, in one line naming the flag; `overwrite` replaces
    the weight files and leaves the user's other files."""
    from llava_jax.convert.safetensors_io import SafetensorsFile

    root, _, _ = stages
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {"x": "model-00001-of-00002.safetensors"}}')
    (out / "notes.txt").write_text("mine")
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "llava_jax.export", f"--workdir={root / 'stage2'}", f"--out={out}"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (f"error: {out} is not empty: pass --overwrite (overwrite=True) to "
                                                 "replace the model in it (its weight files are removed first, "
                                                 "other files are kept)")
    assert (out / "model-00001-of-00002.safetensors").read_bytes() == b"old shard"
    # the CLI in a subprocess (importing llava_jax.export here would define its absl flags in a
    # test process that may hold tools.aot's, which share names)
    p = subprocess.run([sys.executable, "-m", "llava_jax.export", f"--workdir={root / 'stage2'}", f"--out={out}",
                        "--overwrite"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(x.name for x in out.glob("*.safetensors*")) == ["model.safetensors"]
    assert (out / "notes.txt").read_text() == "mine" and SafetensorsFile(out / "model.safetensors").keys()
