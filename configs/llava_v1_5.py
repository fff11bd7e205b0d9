"""LLaVA-1.5 recipe (7B / 13B, stage 1 and stage 2).

    python -m llava_jax.train --config=configs/llava_v1_5.py:7b_stage1 --workdir=DIR \
        --config.model.clip_path=/ckpt/clip-vit-large-patch14-336 \
        --config.model.llm_path=/ckpt/vicuna-7b-v1.5 \
        --config.data.sources=/data/blip_laion_cc_sbu_558k.json --config.data.image_folder=/data/images
    python -m llava_jax.train --config=configs/llava_v1_5.py:7b_stage2 --workdir=DIR2 \
        --config.model.init_from_workdir=DIR ...

Defaults follow the original scripts: stage 1 trains the projector only (plain template,
batch 256, lr 1e-3, wd 0, 1 epoch, cosine with 3% warmup, max length 2048, mlp2x_gelu, CLIP
ViT-L/14-336 layer -2); stage 2 trains projector + LLM (vicuna_v1, batch 128, lr 2e-5, pad mode).
`7b_lora` / `13b_lora`: stage 2 with LoRA as the original `finetune_lora.sh`: r=128, alpha=256,
dropout 0.05 on q/k/v/o/gate/up/down of a frozen Vicuna, lr 2e-4 with the projector at 2e-5
(`optim.group_lr`); the projector trains fully. `7b_qlora` / `13b_qlora`: the same over a frozen
Vicuna stored int4 (QLoRA, `model.base_quant`; `--config.model.base_quant=int8` for int8). Export
the adapter with `python -m llava_jax.export --format=peft` (or a merged llava-hf dir with the
default format: a QLoRA base is written dequantized, the adapters merged).
Batches count packed rows of 2048 tokens; set --config.data.pack=False for one sample per row.

The same recipe on other LLM backbones (docs/backbones.md): `llama3_8b_*` (Meta-Llama-3-8B-Instruct,
`llama3` template), `qwen2_7b_*` (Qwen2-7B-Instruct, `qwen2` template), `mistral_7b_*`
(Mistral-7B-Instruct-v0.2, rendered with its tokenizer's own chat template), each with stage1,
stage2 and lora, e.g. `--config=configs/llava_v1_5.py:qwen2_7b_stage2 --config.model.llm_path=/ckpt/Qwen2-7B-Instruct`.
Their geometry (for tools/aot.py without the checkpoints) is the named preset in `model.preset`.

On a Cloud TPU slice, add `@<slice>` for the settings the TPU compiler's estimate ranked fastest
there (`TPU_SETTINGS` below; BENCHMARKS.md, "TPU compiler estimates"), e.g.
`--config=configs/llava_v1_5.py:7b_stage2@v5p-64`: the splash attention kernel, and the mesh,
per-chip batch, remat and loss chunking that fit the slice's HBM. The global batch and every
hyperparameter stay the recipe's. Check a setting before renting with `python -m
llava_jax.tools.aot --config=configs/llava_v1_5.py:7b_stage2@v5p-64 --topology=v5p-64`.
"""
from llava_jax.train.defaults import base_config

# LLM name -> (checkpoint dir name, stage-2 conversation template, geometry preset or "" = by dir name)
LLMS = {
    "7b": ("vicuna-7b-v1.5", "vicuna_v1", ""),
    "13b": ("vicuna-13b-v1.5", "vicuna_v1", ""),
    "llama3_8b": ("Meta-Llama-3-8B-Instruct", "llama3", "llava_llama3_8b"),
    "qwen2_7b": ("Qwen2-7B-Instruct", "qwen2", "llava_qwen2_7b"),
    "mistral_7b": ("Mistral-7B-Instruct-v0.2", "chat_template", "llava_mistral_7b"),
}


# Flags beyond the recipe per (recipe, TPU slice), from compile-only runs of tools/aot.py (the
# estimate's step time and per-chip memory are in BENCHMARKS.md, "TPU compiler estimates"). Every
# entry also sets `model.attention_impl=splash`. `_FSDP`: stage 1's frozen LLM sharded over every
# chip (whole on each chip it does not fit); a larger `train.per_device_batch`: fewer, larger
# accumulation micro-steps (larger matmuls, fewer weight gathers) where the memory allows.
_FSDP = {"train.mesh.data": 1, "train.mesh.fsdp": -1}
TPU_SETTINGS = {
    ("7b_stage1", "v5p-64"): {"train.per_device_batch": 8},
    ("7b_stage2", "v5p-64"): {"train.per_device_batch": 4},
    ("7b_lora", "v5p-64"): {},
    ("13b_stage1", "v5p-64"): {"train.per_device_batch": 4},
    ("13b_stage2", "v5p-64"): {"train.per_device_batch": 4},
    ("13b_lora", "v5p-64"): {},
    ("7b_stage1", "v5p-128"): {"train.per_device_batch": 4},
    ("7b_stage2", "v5p-128"): {"train.per_device_batch": 2},
    ("7b_lora", "v5p-128"): {},
    ("13b_stage1", "v5p-128"): {"train.per_device_batch": 4},
    ("13b_stage2", "v5p-128"): {"train.per_device_batch": 2},
    ("13b_lora", "v5p-128"): {},
    ("7b_stage1", "v5e-64"): {**_FSDP, "train.per_device_batch": 2},
    ("7b_stage2", "v5e-64"): {"train.per_device_batch": 2},
    ("7b_lora", "v5e-64"): {},
    ("13b_stage1", "v5e-64"): _FSDP,
    ("13b_stage2", "v5e-64"): {"model.loss_chunk": 1024},  # 98% of HBM; remat `full` if short of it
    # dots_no_batch needs 17.46 GiB of temporaries even with loss_chunk 1024; full at two rows is 22% faster than at one
    ("13b_lora", "v5e-64"): {"model.remat": "full", "train.per_device_batch": 2},
    ("7b_stage1", "v5e-256"): _FSDP,
    ("13b_stage1", "v5e-256"): _FSDP,
    # 128 rows cannot split over 256 chips at one row per chip: two chips share each row's heads
    ("7b_stage2", "v5e-256"): {"train.mesh.tensor": 2},
    ("7b_lora", "v5e-256"): {"train.mesh.tensor": 2},
    ("13b_stage2", "v5e-256"): {"train.mesh.tensor": 2},
    ("13b_lora", "v5e-256"): {"train.mesh.tensor": 2},
    ("7b_stage1", "v6e-64"): {"train.per_device_batch": 2},
    ("7b_stage2", "v6e-64"): {"train.per_device_batch": 2},
    ("7b_lora", "v6e-64"): {},
    ("13b_stage1", "v6e-64"): {**_FSDP, "train.per_device_batch": 2},
    ("13b_stage2", "v6e-64"): {"train.per_device_batch": 2},
    ("13b_lora", "v6e-64"): {},
}


def _on_tpu_slice(c, recipe: str, tpu: str):
    """`c` with the TPU_SETTINGS of (recipe, tpu) and the splash kernel."""
    if (recipe, tpu) not in TPU_SETTINGS:
        known = sorted(t for r, t in TPU_SETTINGS if r == recipe)
        hint = (f"known slices for {recipe}: {', '.join(known)}" if known else
                f"recipes with TPU settings: {', '.join(sorted({r for r, _ in TPU_SETTINGS}))}")
        raise ValueError(f"no TPU settings for {recipe}@{tpu}; {hint} (or pass the flags yourself: launch/README.md)")
    c.model.attention_impl = "splash"
    c.update_from_flattened_dict(TPU_SETTINGS[recipe, tpu])
    return c


def get_config(arg: str = "7b_stage1"):
    arg, _, tpu = arg.partition("@")
    c = _recipe(arg)
    return _on_tpu_slice(c, arg, tpu) if tpu else c


def _recipe(arg: str):
    size, _, stage = arg.rpartition("_")
    if size not in LLMS or stage not in ("stage1", "stage2", "lora", "qlora"):
        raise ValueError(f"unknown config {arg!r}; use <llm>_<stage> with llm one of {', '.join(LLMS)} and stage "
                         "one of stage1, stage2, lora, qlora (e.g. 7b_stage1, qwen2_7b_stage2, 13b_qlora)")
    qlora = stage == "qlora"
    lora = stage in ("lora", "qlora")
    stage = "stage2" if lora else stage
    llm_dir, template, preset = LLMS[size]
    prefix = "llava-v1.5" if llm_dir.startswith("vicuna") else "llava"
    c = base_config()
    c.name = f"{prefix}-{size}-{stage}"
    c.model.init = "clip_llama"
    c.model.clip_path = "clip-vit-large-patch14-336"
    c.model.llm_path = llm_dir
    c.model.preset = preset
    c.model.projector_type = "mlp2x_gelu"
    c.model.vision_feature_layer = -2
    c.model.remat = "dots_no_batch"
    # Attention stays `xla` (runs on every backend). On TPU pass --config.model.attention_impl=splash:
    # the fused kernel, less memory and by the compiler's estimate 1.2-1.8x faster stage-2 steps
    # (launch/README.md, BENCHMARKS.md "TPU compiler estimates").
    c.data.max_length = 2048
    c.optim.warmup_ratio = 0.03
    c.optim.weight_decay = 0.0
    if stage == "stage1":
        c.stage = 1
        c.trainable = (r"projector/.*",)
        c.data.template = "plain"
        c.data.image_mode = "crop"
        c.train.global_batch = 256
        c.optim.lr = 1e-3
        # The frozen LLM (and tower) stored in bf16, the dtype every use casts them to: bit-identical
        # steps (docs/performance.md), half the frozen memory. On the data-parallel mesh every chip
        # holds the whole LLM: 13B on v5p-128 needs 85.5 GiB of 95.7 per chip without this.
        c.model.cast_frozen = True
    else:
        c.stage = 2
        c.trainable = (r"projector/.*", r"llm/.*",)
        c.model.init_from_workdir_patterns = (r"projector/.*",)
        c.data.template = template
        c.data.image_mode = "pad"
        c.train.global_batch = 128
        c.optim.lr = 2e-5
        c.train.mesh.fsdp = -1
        c.train.mesh.data = 1
    if lora:
        c.name = f"{prefix}-{size}-lora"
        c.model.lora.update(rank=128, alpha=256.0, dropout=0.05)
        c.trainable = (r".*lora.*", r"projector/.*")
        c.optim.lr = 2e-4
        c.optim.group_lr = ((r"projector/.*", 2e-5),)
    if qlora:
        c.name = f"{prefix}-{size}-qlora"
        c.model.base_quant = "int4"
    return c
