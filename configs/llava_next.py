"""LLaVA-NeXT recipe (llava-v1.6 on Vicuna-7B / 13B v1.5 or Mistral-7B-Instruct-v0.2), stage 1 and stage 2.

    python -m llava_jax.train --config=configs/llava_next.py:vicuna_7b_stage1 --workdir=S1 \
        --config.model.clip_path=/ckpt/clip-vit-large-patch14-336 \
        --config.model.llm_path=/ckpt/vicuna-7b-v1.5 \
        --config.data.sources=/data/blip_laion_cc_sbu_558k.json --config.data.image_folder=/data/images
    python -m llava_jax.train --config=configs/llava_next.py:vicuna_7b_stage2 --workdir=S2 \
        --config.model.init_from_workdir=S1 ...same model paths... \
        --config.data.sources=/data/llava_next_779k.json --config.data.image_folder=/data/images

Stage 1 is LLaVA-1.5's (`configs/llava_v1_5.py`, which this file starts from): the projector only,
at the tower's base resolution (one 336 px view per image, no AnyRes), plain template, batch 256,
lr 1e-3. Stage 2 follows LLaVA-NeXT's `finetune_clip.sh`: AnyRes over the llava-v1.6 canvases
(`model.image_grid_pinpoints`: grids 1x2, 2x1, 2x2, 3x1, 1x3 of 336 px tiles + the base view,
"spatial_unpad" with `image_newline`), the LLM, the projector AND the vision tower trained, lr
1e-5 with the tower at 2e-6 (`optim.group_lr`, its `mm_vision_tower_lr`), wd 0, cosine with 3%
warmup, rows of 4096 tokens, batch 128. The stage-1 projector comes in through
`model.init_from_workdir` (or `model.projector_path`); `projector/image_newline`, which stage 1
never had, starts fresh (N(0, 1/hidden), as transformers initialises it) and trains in stage 2.

Rows: an image takes 576 to 2928 tokens, so a 4096-token row holds 2 image slots
(`data.max_images_per_row`); every slot is 5 views through the tower whether used or not (static
shapes: 10 CLIP-L/336 passes per row, forward and backward, about 6% of the 7B step's FLOPs;
docs/anyres.md "Cost"). `data.max_views_per_row` bounds the real views a row's samples may take.
Geometry without the checkpoints (tools/aot.py): the presets `llava_v1_6_vicuna_7b`,
`llava_v1_6_vicuna_13b`, `llava_v1_6_mistral_7b` (`model.preset`).
"""
import importlib.util
from pathlib import Path

from llava_jax.presets import LLAVA_V1_6_PINPOINTS

# LLM -> (its name in configs/llava_v1_5.py, the stage-2 geometry preset)
LLMS = {
    "vicuna_7b": ("7b", "llava_v1_6_vicuna_7b"),
    "vicuna_13b": ("13b", "llava_v1_6_vicuna_13b"),
    "mistral_7b": ("mistral_7b", "llava_v1_6_mistral_7b"),
}


def _llava_v1_5():
    spec = importlib.util.spec_from_file_location("llava_v1_5_recipe", Path(__file__).with_name("llava_v1_5.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg: str = "vicuna_7b_stage1"):
    llm, _, stage = arg.rpartition("_")
    if llm not in LLMS or stage not in ("stage1", "stage2"):
        raise ValueError(f"unknown config {arg!r}; use <llm>_<stage> with llm one of {', '.join(LLMS)} and stage "
                         "stage1 or stage2 (e.g. vicuna_7b_stage2)")
    v15_name, preset = LLMS[llm]
    c = _llava_v1_5().get_config(f"{v15_name}_{stage}")
    c.name = f"llava-v1.6-{llm.replace('_', '-')}-{stage}"
    if stage == "stage1":
        return c
    c.model.image_grid_pinpoints = LLAVA_V1_6_PINPOINTS
    c.model.preset = preset
    c.trainable = (r"projector/.*", r"llm/.*", r"vision/.*")
    c.optim.lr = 1e-5
    c.optim.group_lr = ((r"vision/.*", 2e-6),)
    c.data.max_length = 4096
    c.data.max_images_per_row = 2
    return c
