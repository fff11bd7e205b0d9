"""The demo's vision-tower pretraining (stand-in for CLIP): per-patch labels agree with the
rendered pixels, training changes only the tower and reaches the labels, and its workdir feeds a
later stage through `model.init_from_workdir` (several workdirs, comma-separated)."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from llava_jax.demo import dataset
from llava_jax.demo.tower import cell_labels, pretrain_tower

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grid_world(tmp_path_factory):
    from llava_jax.data.tokenizer_build import build_llama_tokenizer
    from llava_jax.demo.run import SYSTEM, corpus

    root = tmp_path_factory.mktemp("grid_world")
    dataset.generate(root / "data", num_train=160, num_eval=24, seed=1, image_size=16, grid=2,
                       size_range=(0.6, 0.9), max_objects=3)
    build_llama_tokenizer(corpus(root / "data") + [SYSTEM], root / "tok", vocab_size=400)
    return root


def _config(world, arg="tiny_stage1"):
    from llava_jax.demo.run import load_demo_config

    c = load_demo_config(arg)
    c.tokenizer_path = str(world / "tok")
    return c


def _model(c):
    from llava_jax import build
    from llava_jax import sharding as shd

    tok, ids = build.tokenizer(c)
    return build.model(c, shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]), ids, vocab_size=len(tok))


def test_cell_labels_match_rendered_pixels(grid_world):
    data = grid_world / "data"
    anns = [json.loads(x) for x in (data / "annotations.jsonl").read_text().splitlines()]
    world = json.loads((data / "manifest.json").read_text())["config"]
    colors, shapes = list(world["colors"]), list(world["shapes"])
    col, shp = cell_labels(anns, 2, colors, shapes)
    assert col.shape == (160, 4) and (col > 0).sum() == sum(len(a["instances"]) for a in anns)
    for i, ann in enumerate(anns[:40]):
        px = np.asarray(Image.open(data / "images" / ann["image"]).convert("RGB"))
        for cell in range(4):
            r, c = divmod(cell, 2)
            block = px[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].reshape(-1, 3)
            non_bg = {tuple(p) for p in block if tuple(p) != (255, 255, 255)}
            if col[i, cell] == 0:
                assert not non_bg and shp[i, cell] == 0
            else:  # the only non-background colour in the cell is the labelled one
                assert non_bg == {tuple(world["colors"][colors[col[i, cell] - 1]])}
                assert shp[i, cell] > 0


@pytest.mark.slow  # 37 s on 2 cores (CI time); the demo runs the same pretraining
def test_pretrain_trains_only_the_tower_and_feeds_later_stages(grid_world, tmp_path):
    c = _config(grid_world)
    model = _model(c)
    before = [(k, np.array(v.value)) for k, v in nnx.to_flat_state(nnx.state(model))]
    res = pretrain_tower(model, grid_world / "data", tmp_path / "tower", steps=150, batch_size=32, lr=1e-2,
                         log=lambda *_: None)
    after = dict(nnx.to_flat_state(nnx.state(model)))
    changed = {"/".join(map(str, k)) for k, v in before if not np.array_equal(v, np.asarray(after[k].value))}
    assert changed and all(k.startswith("vision/") for k in changed), sorted(changed)[:5]
    # 4 colours x 4 shapes + empty cells, 16-px images with 8-px cells: learnable in 150 steps
    assert res["object_color_acc"] > 0.9, res
    assert res["cell_shape_acc"] > 0.6, res
    assert res["object_pair_acc"] > 0.5, res  # chance: 1 in 16 (colour, shape) pairs
    assert res["patch_position_acc"] > 0.5, res  # chance: 1 in 4 patches

    # a later stage: tower from the pretraining workdir, projector from another workdir
    from llava_jax.checkpoint import Checkpointer
    from llava_jax.train_step import split_model

    other = _model(c)
    proj = jax.tree.map(lambda x: x + 1.0, nnx.state(other.projector))
    nnx.update(other.projector, proj)
    _, trainable, _ = split_model(other, (r"projector/.*",))
    ck = Checkpointer(tmp_path / "proj", async_save=False)
    ck.save(1, trainable, {"unused": np.zeros((), np.int32)}, jax.random.key(0), meta={"trainable": [r"projector/.*"]})
    ck.close()
    c.model.init_from_workdir = f"{tmp_path / 'tower'},{tmp_path / 'proj'}"
    fresh = _model(c)
    for a, b in zip(jax.tree.leaves(nnx.state(fresh.vision)), jax.tree.leaves(nnx.state(model.vision))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(nnx.state(fresh.projector)), jax.tree.leaves(proj)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pretrain_refuses_a_world_without_a_matching_grid(tmp_path):
    dataset.generate(tmp_path / "free", num_train=4, num_eval=2, image_size=16)

    class Fake:  # only the config is read before the check
        config = type("C", (), {"vision": type("V", (), {"image_size": 16, "patch_size": 8})()})()

    with pytest.raises(ValueError, match="grid"):
        pretrain_tower(Fake(), tmp_path / "free", tmp_path / "w", steps=1)
