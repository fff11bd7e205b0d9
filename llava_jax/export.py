"""Export a training stage's final params to a llava-hf directory:

    python -m llava_jax.export --config=configs/llava_v1_5.py:7b_stage2 --workdir=DIR --out=HF_DIR

The model is rebuilt exactly as the trainer built it (base checkpoints / seeded init + the
previous stage's params), the workdir's latest (or --step) trained params are applied, and the
result is written with `save_pretrained` (legacy llava-hf layout, sharded safetensors, config,
processor configs and the run's tokenizer). `transformers.LlavaForConditionalGeneration` loads it.
"""
from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "the run's config file (path:arg)", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "the training workdir to export")
_OUT = flags.DEFINE_string("out", None, "output HF directory")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "stored weight dtype")
flags.mark_flags_as_required(["config", "workdir", "out"])


def export(config, workdir: str, out: str, dtype: str = "float32"):
    from llava_jax.convert.hf import save_pretrained
    from llava_jax.train import mesh as mesh_lib
    from llava_jax.train.trainer import apply_workdir_params, build_model, load_run_tokenizer

    tokenizer, ids = load_run_tokenizer(config)
    mesh = mesh_lib.make_mesh(dict(config.train.mesh))
    model = build_model(config, mesh, ids, vocab_size=len(tokenizer))
    model = apply_workdir_params(model, workdir, [r".*"])
    save_pretrained(model, out, tokenizer=tokenizer, dtype=dtype)
    logging.info("exported %s -> %s", workdir, out)
    return model


def main(argv):
    del argv
    export(_CONFIG.value, _WORKDIR.value, _OUT.value, _DTYPE.value)
    if jax.process_index() == 0:
        print(f"exported {_WORKDIR.value} to {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
