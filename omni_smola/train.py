r"""Trains a model: `python -m omni_smola.train --gin_file=... --gin.MODEL_DIR=...`.

    python -m omni_smola.train \
      --gin_file=experiments/mini_generalist.gin \
      --gin.MODEL_DIR=/tmp/runs/generalist --gin.TRAIN_STEPS=500

Resumes from the latest checkpoint in MODEL_DIR when there is one. Exits 0 after
saving a checkpoint on SIGTERM (preemption), 1 with a one-line message on bad
input or a non-finite loss. See `omni_smola.training.trainer.train` for what gin
binds and `omni_smola.launching` for the flags.
"""
if __name__ == "__main__":
  from omni_smola import console  # pylint: disable=g-import-not-at-top
  console.hold_native_stderr()  # before TensorFlow loads and prints its start-up lines

from absl import logging

from omni_smola import launching
from omni_smola.training import trainer

FLAGS = launching.FLAGS


def main(argv):
  result = launching.run_configured(argv, "train", "MODEL_DIR", trainer.train)
  if result.preempted:
    logging.warning("Stopped by preemption at step %d; relaunch to resume", result.step)


def console_entry_point():
  launching.run(main)


if __name__ == "__main__":
  console_entry_point()
