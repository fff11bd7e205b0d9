"""configs/llava_next.py: the stage-1 / stage-2 recipes build (llava-v1.6 geometry, abstract: no
weight is allocated), the vision tower lands in the low-lr group, the batch spec is AnyRes's, and
the stage-1 -> stage-2 hand-off loads the base-resolution projector into the AnyRes model."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx

from llava_jax import build
from llava_jax import sharding as shd
from llava_jax.presets import LLAVA_V1_6_PINPOINTS, PRESETS
from llava_jax.models.llava import LlavaModel
from llava_jax.train_step import lr_groups, make_optimizer, param_count_by_subtree, split_model
from train_util import recipes


def recipe(arg):
    return recipes("llava_next").get_config(arg)


def elsewhere(c):
    """The recipe with checkpoint dirs that are not on this machine: geometry from the presets."""
    c.model.clip_path = "/nowhere/clip-vit-large-patch14-336"
    c.model.llm_path = "/nowhere/" + c.model.llm_path
    return c


@pytest.mark.parametrize("llm, hidden, layers", [("vicuna_7b", 4096, 32), ("vicuna_13b", 5120, 40),
                                                 ("mistral_7b", 4096, 32)])
def test_stage1_is_base_resolution_and_stage2_anyres(llm, hidden, layers):
    s1, s2 = elsewhere(recipe(f"{llm}_stage1")), elsewhere(recipe(f"{llm}_stage2"))
    c1, c2 = build.model_config(s1), build.model_config(s2)
    assert not c1.is_anyres and s1.trainable == (r"projector/.*",) and s1.optim.lr == 1e-3
    assert c2.image_grid_pinpoints == LLAVA_V1_6_PINPOINTS and c2.max_tiles == 4
    assert (c2.text.hidden_size, c2.text.num_layers, c2.vision.image_size) == (hidden, layers, 336)
    assert c2 == PRESETS[s2.model.preset]().replace(runtime=c2.runtime)  # the preset is the recipe's geometry
    assert (s2.optim.lr, dict(s2.optim.group_lr), s2.data.max_length) == (1e-5, {r"vision/.*": 2e-6}, 4096)
    assert s2.model.init_from_workdir_patterns == (r"projector/.*",)
    with pytest.raises(ValueError, match="unknown config"):
        recipe(f"{llm}_stage3")


def test_stage2_tower_trains_at_the_low_lr():
    """The whole 7B stage-2 model, abstract: everything trains; exactly the CLIP tower's params
    (counted) are in the 2e-6 group, the LLM and projector (image_newline included) at 1e-5,
    and the optimizer holds moments for all of them."""
    c = elsewhere(recipe("vicuna_7b_stage2"))
    cfg = build.model_config(c, vocab_size=32064)
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = nnx.merge(*shd.abstract_model(lambda: LlavaModel(cfg, rngs=None), mesh))
    _, trainable, frozen = split_model(model, c.trainable)
    assert not jax.tree.leaves(frozen)
    lrs, labels = lr_groups(c.optim, trainable)
    assert lrs == {"default": 1e-5, "group0": 2e-6}
    counts = {}
    for (keys, v), g in zip(jax.tree_util.tree_flatten_with_path(trainable)[0], jax.tree.leaves(labels)):
        key = (str(getattr(keys[0], "key", keys[0])), g)
        counts[key] = counts.get(key, 0) + math.prod(v.shape)
    sizes = param_count_by_subtree(trainable)
    assert counts == {("vision", "group0"): sizes["vision"], ("projector", "default"): sizes["projector"],
                      ("llm", "default"): sizes["llm"]}
    assert 300e6 < sizes["vision"] < 310e6  # CLIP ViT-L/14-336
    print({k: f"{v / 1e6:.1f}M" for k, v in counts.items()})
    tx, _ = make_optimizer(c.optim, 100, trainable)
    moments = sum(math.prod(x.shape) for x in jax.tree.leaves(jax.eval_shape(tx.init, trainable)) if x.ndim)
    assert moments == 2 * sum(sizes.values())  # Adam's two moments per trained param, no more

    spec = build.batch_spec(c, cfg, mesh, rows=4)
    assert spec["tiles"].shape == (4, 2, 5, 336, 336, 3) and spec["image_index"].shape == (4, 4096)
    assert "images" not in spec


def test_stage1_projector_hands_off_to_the_anyres_model(tmp_path):
    """A stage-1 run's projector (base resolution: no image_newline) loads into the stage-2
    AnyRes model through `init_from_workdir`; image_newline keeps its fresh init."""
    from llava_jax.checkpoint import Checkpointer
    from test_anyres_pipeline import anyres_config, init_model

    anyres_cfg = anyres_config(800)
    stage1 = init_model(anyres_cfg.replace(image_grid_pinpoints=None))
    _, trained, _ = split_model(stage1, [r"projector/.*"])
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(1, trained, jax.tree.map(np.zeros_like, trained), jax.random.key(0), None,
            meta={"trainable": [r"projector/.*"]})
    ck.close()
    stage2 = init_model(anyres_cfg, seed=1)
    newline = np.asarray(stage2.projector.image_newline.value).copy()
    stage2, loaded = build.apply_workdir_params(stage2, str(tmp_path), [r"projector/.*"])
    assert "projector/image_newline" not in loaded and "projector/linear_1_kernel" in loaded
    np.testing.assert_array_equal(np.asarray(stage2.projector.linear_1_kernel.value),
                                  np.asarray(stage1.projector.linear_1_kernel.value))
    np.testing.assert_array_equal(np.asarray(stage2.projector.image_newline.value), newline)
