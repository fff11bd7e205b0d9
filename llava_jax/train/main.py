"""`python -m llava_jax.train --config=configs/llava_v1_5.py:7b_stage1 --workdir=DIR [--config.x=...]`"""
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (path:arg)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs and metrics go here (local or gs://)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from llava_jax.train.runtime import maybe_initialize_distributed
    from llava_jax.train.trainer import train

    maybe_initialize_distributed()
    train(_CONFIG.value, _WORKDIR.value)


def run():
    app.run(main)
