r"""Routing analysis of a checkpoint: expert load, entropy and top experts per task and layer.

    python -m omni_smola.analyze \
      --gin_file=models/mini.gin --gin_file=adapters/omni_smola.gin \
      --gin.CHECKPOINT_PATH=/tmp/runs/generalist \
      --gin.MIXTURE_OR_TASK_NAME=mini_generalist --gin.ANALYSIS_NUM_BATCHES=8

Pass the model and adapter configs the checkpoint was trained with (or the
experiment's gin file). Writes `routing.json` and `figures/*.png` to
ANALYSIS_OUTPUT_DIR (default MODEL_DIR/analysis/<step>). The macros and their
defaults (split, batch size, batches per task, ...) are in
omni_smola/analysis/analyze.gin; the flags are the train binary's (see
`omni_smola.launching`). Runs in one process.
"""
if __name__ == "__main__":
  from omni_smola import console  # pylint: disable=g-import-not-at-top
  console.hold_native_stderr()  # before TensorFlow loads and prints its start-up lines

import os
from typing import Sequence

from absl import logging

from omni_smola import console
from omni_smola import launching

FLAGS = launching.FLAGS
DEFAULTS_GIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "analysis",
                            "analyze.gin")


def parse_config(gin_files: Sequence[str], gin_bindings: Sequence[str],
                 search_paths: Sequence[str] = (launching.REPO_GIN_CONFIGS,)) -> None:
  """analyze.gin's defaults first, then the user's files and bindings (which win)."""
  launching.parse_gin([DEFAULTS_GIN, *gin_files], gin_bindings, search_paths)


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  console.quiet_terminal()
  if FLAGS.tfds_data_dir:
    import seqio  # pylint: disable=g-import-not-at-top
    seqio.set_tfds_data_dir_override(FLAGS.tfds_data_dir)

  def run():
    from omni_smola.analysis import routing  # pylint: disable=g-import-not-at-top
    parse_config(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    launching.start_log_file(launching.macro_value("ANALYSIS_OUTPUT_DIR"), "analyze")
    return routing.analyze()

  summary = launching.exit_on_user_error(run)
  logging.info("wrote %s", summary["output_dir"])
  print(f"routing analysis: {len(summary['tasks'])} tasks, {len(summary['layers'])} layers, "
        f"{len(summary.get('figures', []))} figures -> {summary['output_dir']}")


if __name__ == "__main__":
  launching.run(main)
