"""The offline end-to-end demo: python -m llava_jax.demo [--out=DIR] [--seed=N]

Generates the synthetic shapes world, trains a small tokenizer and the tiny vision tower, runs
stage 1 and stage 2 with the real trainer, prints held-out accuracy per question type, answers
questions about new images and exports the model as a llava-hf directory (OUT/hf), printing the
chat, serve and eval commands that use it. No downloads. See llava_jax/demo/run.py and the README.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from absl import flags

from llava_jax.cli import run_absl
from llava_jax.demo.run import DemoOptions, run

_D = DemoOptions()
FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/llava_jax_demo", "where data, checkpoints, results and the exported model go")
flags.DEFINE_integer("num_train", _D.num_train, "training images")
flags.DEFINE_integer("num_eval", _D.num_eval, "held-out images (3 questions each)")
flags.DEFINE_integer("stage1_epochs", _D.stage1_epochs, "stage-1 epochs")
flags.DEFINE_integer("stage2_epochs", _D.stage2_epochs, "stage-2 epochs")
flags.DEFINE_integer("tower_steps", _D.tower_steps, "vision-tower pretraining steps (the stand-in for CLIP)")
flags.DEFINE_integer("seed", _D.seed, "world, data order and tower seed")
flags.DEFINE_integer("max_objects", _D.max_objects, "shapes per image: 1..max_objects")
flags.DEFINE_bool("fresh", True, "delete --out first (False: resume the stages where they stopped)")


def main(argv):
    del argv
    out = Path(FLAGS.out)
    if FLAGS.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    opts = DemoOptions(num_train=FLAGS.num_train, num_eval=FLAGS.num_eval, stage1_epochs=FLAGS.stage1_epochs,
                       stage2_epochs=FLAGS.stage2_epochs, tower_steps=FLAGS.tower_steps, seed=FLAGS.seed,
                       max_objects=FLAGS.max_objects)
    run(out, opts)


if __name__ == "__main__":
    run_absl(main, sys.modules[__name__])
