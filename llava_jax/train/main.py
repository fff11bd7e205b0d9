"""Train one stage of LLaVA:

    python -m llava_jax.train --config=configs/llava_v1_5.py:7b_stage1 --workdir=DIR [--config.x.y=VALUE ...]

`--config` is an experiment file and its argument (configs/llava_v1_5.py: 7b_stage1, 7b_stage2,
13b_stage1, 13b_stage2; configs/demo.py: stage1, stage2); every field of it can be overridden on
the command line, e.g. --config.model.llm_path=/models/vicuna-7b-v1.5
--config.data.sources=/data/blip_laion_cc_sbu_558k.json --config.train.global_batch=256 (all
fields and their defaults: llava_jax/train/defaults.py). The workdir receives checkpoints,
metrics.jsonl, TensorBoard logs, skipped rows and run_config.json; re-running the same command
resumes from its newest checkpoint. On several hosts every host runs the same command (see
launch/README.md).
"""
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (path:arg)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs and metrics go here (local or gs://)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from llava_jax.convert.hf import CheckpointError
    from llava_jax.data.skips import NoTrainingData
    from llava_jax.train.runtime import maybe_initialize_distributed
    from llava_jax.train.trainer import train

    maybe_initialize_distributed()
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (CheckpointError, NoTrainingData) as e:  # no intact checkpoint, no usable data: one line says why
        sys.exit(f"error: {e}")


def run():
    from llava_jax.cli import run_absl

    run_absl(main, sys.modules[__name__])
