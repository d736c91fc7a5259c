r"""Runs a study: arms x seeds of training runs from one gin file, then its tables and figures.

    python -m omni_smola.study --gin_file=studies/mini_table3.gin [--quick]
        [--study_dir=runs/studies/mini_table3] [--validate_only] [--gin.NAME=VALUE]

The study gin file binds `omni_smola.studies.spec.Study` (its arms, seeds, mixture; see
`studies/spec.py`). Every run is checked before the first one trains (gin files, tasks,
adapters, seeds, run directories); then each arm/seed trains in its own directory
(`<study_dir>/<arm>/seed_<s>[/<task>]`), evaluating at its end, through the trainer's own
code in this process. A rerun skips finished runs and resumes the others; a failed run is
recorded and the rest go on. `results.json`, `results.md` and `figures/` summarise it
(`studies/results.py`, `studies/plots.py`). `--quick`: the first seed, the study's quick
bindings (few steps) and data (`Study.quick_name_suffix`), in `<study_dir>_quick`.
"""
if __name__ == "__main__":
  from omni_smola import console  # pylint: disable=g-import-not-at-top
  console.hold_native_stderr()  # before TensorFlow loads and prints its start-up lines

import os

from absl import flags
from absl import logging

from omni_smola import console
from omni_smola import launching

flags.DEFINE_string("study_dir", None, "Where the study's runs and results go (default "
                    "runs/studies/<Study.name>, with '_quick' for --quick).")
flags.DEFINE_bool("quick", False, "One seed, the study's quick bindings and data names.")
flags.DEFINE_bool("validate_only", False, "Check every arm and run (and count each arm's "
                  "parameters and FLOPs), train nothing.")
FLAGS = flags.FLAGS


def default_study_dir(name: str, quick: bool) -> str:
  return os.path.join("runs", "studies", name + ("_quick" if quick else ""))


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  launching.initialize_from_flags()
  from omni_smola.studies import runner  # pylint: disable=g-import-not-at-top
  from omni_smola.studies.spec import StudyConfigError  # pylint: disable=g-import-not-at-top

  def run():
    # Not finalized: arms' task modules register gin configurables when the runs parse.
    launching.parse_gin_from_flags(finalize=False)
    study = runner.configured_study(FLAGS.quick)
    study_dir = os.path.abspath(FLAGS.study_dir or default_study_dir(study.name, FLAGS.quick))
    if FLAGS.validate_only:
      runs, tasks, _ = runner.prepare(study, study_dir)
      print(f"study {study.name}: {len(study.arms)} arms, {len(runs)} runs over "
            f"{len(tasks)} tasks: valid")
      return
    os.makedirs(study_dir, exist_ok=True)
    launching.start_log_file(study_dir, "study")
    import jax  # pylint: disable=g-import-not-at-top
    # Compiled programs are shared by the arms' seeds and by the next run of the study.
    jax.config.update("jax_compilation_cache_dir", os.path.join(study_dir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    summary = runner.run_study(study, study_dir, FLAGS.quick)
    with open(os.path.join(study_dir, "results.md")) as f:
      print(f.read(), flush=True)
    failed = [n for n, a in summary["arms"].items() if a["status"] != "done"]
    if failed:
      logging.error("[study] arms not finished on every seed: %s", ", ".join(failed))

  from omni_smola.studies.execute import StudyPreemptedError  # pylint: disable=g-import-not-at-top
  try:
    launching.exit_on_user_error(run)
  except StudyConfigError as e:
    raise SystemExit(f"error (StudyConfigError): {e}") from None
  except StudyPreemptedError as e:
    # As the train binary: a preempted job exits 0 and the relaunch resumes.
    logging.warning("[study] %s", e)


if __name__ == "__main__":
  console.quiet_terminal()
  launching.run(main)
