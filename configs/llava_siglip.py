"""LLaVA-1.5 recipe with a SigLIP so400m-14-384 tower instead of CLIP: Vicuna-7B (`7b_<stage>`) or
Qwen2-7B-Instruct (`qwen2_7b_<stage>`), stage one of stage1, stage2, lora, qlora.

    python -m llava_jax.train --config=configs/llava_siglip.py:7b_stage1 --workdir=DIR \
        --config.model.clip_path=/ckpt/siglip-so400m-patch14-384 \
        --config.model.llm_path=/ckpt/vicuna-7b-v1.5 \
        --config.data.sources=/data/blip_laion_cc_sbu_558k.json --config.data.image_folder=/data/images
    python -m llava_jax.train --config=configs/llava_siglip.py:7b_stage2 --workdir=DIR2 \
        --config.model.init_from_workdir=DIR ...
    python -m llava_jax.tools.aot --config=configs/llava_siglip.py:7b_stage2 --topology=v5p-64
    # SigLIP x Qwen2-7B-Instruct (LLaVA-OneVision's pairing, base resolution):
    python -m llava_jax.tools.aot --config=configs/llava_siglip.py:qwen2_7b_stage2 --topology=v5p-64

Everything as `configs/llava_v1_5.py` (same schedules, batches, templates, LoRA variant
`7b_lora`) except the tower: `model.clip_path` names a SigLIP dir (google/siglip-so400m-patch14-384,
a full SiglipModel or a SiglipVisionModel), features are the output of its 26th of 27 layers
(layer -2, as LLaVA-NeXT/OneVision, which delete the last layer) with every token ("full": SigLIP
has no class token): 729 image tokens. Images are preprocessed by SigLIP's processor (square
resize, mean/std 0.5) read from the tower dir's preprocessor_config.json; "pad" pastes on a
(127, 127, 127) canvas first. Without local checkpoints the geometry is the preset
`llava_siglip_7b` / `llava_siglip_qwen2_7b` (`PRESETS` in llava_jax/presets.py).
"""
import importlib.util
from pathlib import Path


def llava_v1_5_config(arg: str):
    """configs/llava_v1_5.py's config (loaded by path: config files are not a package)."""
    spec = importlib.util.spec_from_file_location("llava_v1_5_config", Path(__file__).with_name("llava_v1_5.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# LLM -> the SigLIP preset (the geometry without checkpoints); the rest comes from llava_v1_5.py's
# recipe of that LLM (templates, schedules, batches, LoRA / QLoRA variants).
PRESETS = {"7b": "llava_siglip_7b", "qwen2_7b": "llava_siglip_qwen2_7b"}


def get_config(arg: str = "7b_stage1"):
    llm, _, stage = arg.rpartition("_")
    if llm not in PRESETS:
        raise ValueError(f"unknown config {arg!r}; use <llm>_<stage> with llm one of {', '.join(PRESETS)} and a "
                         "stage of configs/llava_v1_5.py (stage1, stage2, lora, qlora), e.g. qwen2_7b_stage2")
    c = llava_v1_5_config(arg)
    c.name = c.name.replace("llava-v1.5", "llava-siglip") if llm == "7b" else c.name.replace("llava-", "llava-siglip-")
    c.model.clip_path = "siglip-so400m-patch14-384"
    c.model.preset = PRESETS[llm]
    c.model.vision_feature_layer = -2
    c.model.vision_feature_select_strategy = "full"
    return c
