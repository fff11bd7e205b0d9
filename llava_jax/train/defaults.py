"""The full set of training config fields with defaults; experiment files in `configs/` start
from `base_config()` and override. Every field is settable from the command line as
`--config.<group>.<field>=...` (ml_collections config_flags)."""
from __future__ import annotations

import ml_collections

from llava_jax.models.lora import DEFAULT_TARGETS


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "llava"
    c.stage = 1
    # Regexes over param paths (vision/..., projector/..., llm/...): what trains this stage.
    c.trainable = (r"projector/.*",)

    c.model = ml_collections.ConfigDict()
    # scratch: random init from model.scratch | clip_llama: CLIP dir + LLaMA/Vicuna dir (fresh
    # projector) | hf: a llava-hf or original-LLaVA dir (hf_path; clip_path for the latter).
    c.model.init = "clip_llama"
    c.model.hf_path = ""
    c.model.clip_path = ""
    c.model.llm_path = ""
    c.model.projector_path = ""  # a stage-1 projector file (mm_projector.bin / safetensors)
    # A named geometry (llava_jax.presets.PRESETS: llava_1_5_7b, llava_1_5_13b) for tools that need
    # only shapes (tools/aot.py) when the checkpoint dirs are not on this machine; "" = the one
    # the llm_path / hf_path directory name stands for.
    c.model.preset = ""
    # A previous stage's workdir: its trained params (e.g. the stage-1 projector) are loaded
    # on top of the model above. Only params matching init_from_workdir_patterns are taken.
    # Several workdirs: comma-separated, applied in order (the demo: "tower,stage1").
    c.model.init_from_workdir = ""
    c.model.init_from_workdir_patterns = (r".*",)
    c.model.projector_type = "mlp2x_gelu"
    c.model.vision_feature_layer = -2
    c.model.vision_feature_select_strategy = "default"
    # LLaVA-NeXT AnyRes: the (height, width) canvases images are tiled onto (docs/anyres.md), e.g.
    # llava_jax.presets.LLAVA_V1_6_PINPOINTS; () = as the checkpoint / preset says (plain LLaVA).
    c.model.image_grid_pinpoints = ()
    c.model.dtype = "bfloat16"  # compute
    c.model.param_dtype = "float32"  # master params
    c.model.remat = "none"
    c.model.attention_impl = "xla"
    # Memory levers (docs/performance.md, "The levers"; both proven equal to the default path):
    # vocab loss in chunks of this many positions (0 = full [B, L, V] logits), and frozen params
    # (CLIP; the LLM in stage 1) stored in model.dtype instead of param_dtype.
    c.model.loss_chunk = 0
    c.model.cast_frozen = False
    c.model.seed = 0
    # LoRA adapters on the LLM's linear layers (llava_jax/models/lora.py; docs/lora.md). rank 0 =
    # none. They are params like any other: train them with trainable=(r".*lora.*", ...); the base
    # they sit on stays frozen. targets: regexes over the base kernels' paths (llm/layers/q_kernel).
    # init_adapter: a PEFT LoRA adapter directory (PEFT's, `export --format=peft`'s, or an original
    # LLaVA LoRA run's output dir, whose non_lora_trainables.bin projector it also takes) to start
    # the adapters from instead of fresh ones; its rank, alpha, rslora and projections must be these.
    c.model.lora = ml_collections.ConfigDict({"rank": 0, "alpha": 16.0, "dropout": 0.0, "rslora": False,
                                              "targets": DEFAULT_TARGETS, "init_adapter": ""})
    # QLoRA: the frozen LLM's linear kernels stored weight-only quantized, "none" | "int8" | "int4"
    # (the serving quantizer, llava_jax/models/quant.py); the adapters and the projector stay in
    # param_dtype and train. Needs model.lora (refused without it).
    c.model.base_quant = "none"
    c.model.scratch = ml_collections.ConfigDict({
        "vision": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
                   "image_size": 32, "patch_size": 8},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
                 "num_kv_heads": 2, "head_dim": 16, "rope_theta": 10000.0, "max_position_embeddings": 2048},
    })

    c.tokenizer_path = ""  # default: model.llm_path or model.hf_path

    c.data = ml_collections.ConfigDict()
    # One LLaVA JSON/JSONL file (images under data.image_folder), or a JSON list of sources:
    # '[{"path": file, "image_folder": dir}, {"tfds": name, "split": "train", "data_dir": dir}]'
    c.data.sources = ""
    c.data.image_folder = ""
    c.data.template = "plain"
    c.data.image_mode = "crop"  # crop | pad (LLaVA-1.5 stage 2 pads to square)
    c.data.max_length = 2048
    c.data.max_images_per_row = 4
    # LLaVA-NeXT AnyRes: the most real views (base + tiles) a row's images take (None: no bound
    # beyond max_images_per_row; data/pipeline.py PipelineConfig)
    c.data.max_views_per_row = ml_collections.config_dict.placeholder(int)
    c.data.pack = True
    c.data.length_policy = "drop"
    c.data.shuffle = True
    c.data.num_epochs = 1
    c.data.seed = 0
    c.data.worker_count = 0
    c.data.skip_log = "skipped.jsonl"  # relative to the workdir

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.03
    c.optim.warmup_steps = ml_collections.config_dict.placeholder(int)
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0
    # Per-group learning rates: ((regex over param paths, lr), ...), first match wins; params no
    # pattern matches take optim.lr. Same schedule shape for every group (e.g. the LoRA recipe's
    # projector at 2e-5 beside adapters at 2e-4: ((r"projector/.*", 2e-5),)).
    c.optim.group_lr = ()

    c.train = ml_collections.ConfigDict()
    c.train.global_batch = 256  # rows per optimizer step, whatever the device count
    c.train.per_device_batch = 1  # rows per device per micro-batch; accumulation fills the rest
    c.train.num_steps = -1  # -1: one pass over num_epochs of the data (rows estimated unpacked)
    c.train.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.train.log_every = 10
    c.train.ckpt_every = 500
    c.train.keep = 3
    c.train.async_checkpoint = True
    c.train.seed = 42
    c.train.peak_tflops = 0.0  # per device; 0 = look up from the device kind
    c.train.tensorboard = True
    c.train.progress_bar = True
    return c
