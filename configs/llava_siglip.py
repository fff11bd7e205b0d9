"""LLaVA-1.5 recipe with a SigLIP so400m-14-384 tower instead of CLIP (7B, stage 1 and stage 2).

    python -m llava_jax.train --config=configs/llava_siglip.py:7b_stage1 --workdir=DIR \
        --config.model.clip_path=/ckpt/siglip-so400m-patch14-384 \
        --config.model.llm_path=/ckpt/vicuna-7b-v1.5 \
        --config.data.sources=/data/blip_laion_cc_sbu_558k.json --config.data.image_folder=/data/images
    python -m llava_jax.train --config=configs/llava_siglip.py:7b_stage2 --workdir=DIR2 \
        --config.model.init_from_workdir=DIR ...
    python -m llava_jax.tools.aot --config=configs/llava_siglip.py:7b_stage2 --topology=v5p-64

Everything as `configs/llava_v1_5.py` (same schedules, batches, templates, LoRA variant
`7b_lora`) except the tower: `model.clip_path` names a SigLIP dir (google/siglip-so400m-patch14-384,
a full SiglipModel or a SiglipVisionModel), features are the output of its 26th of 27 layers
(layer -2, as LLaVA-NeXT/OneVision, which delete the last layer) with every token ("full": SigLIP
has no class token): 729 image tokens. Images are preprocessed by SigLIP's processor (square
resize, mean/std 0.5) read from the tower dir's preprocessor_config.json; "pad" pastes on a
(127, 127, 127) canvas first. Without local checkpoints the geometry is the preset
`llava_siglip_7b` (llava_jax.config).
"""
import importlib.util
from pathlib import Path


def llava_v1_5_config(arg: str):
    """configs/llava_v1_5.py's config (loaded by path: config files are not a package)."""
    spec = importlib.util.spec_from_file_location("llava_v1_5_config", Path(__file__).with_name("llava_v1_5.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = "7b_stage1"):
    if not arg.startswith("7b_"):
        raise ValueError(f"unknown config {arg!r}; use one of 7b_stage1, 7b_stage2, 7b_lora")
    c = llava_v1_5_config(arg)
    c.name = c.name.replace("llava-v1.5", "llava-siglip")
    c.model.clip_path = "siglip-so400m-patch14-384"
    c.model.preset = "llava_siglip_7b"
    c.model.vision_feature_layer = -2
    c.model.vision_feature_select_strategy = "full"
    return c
