"""Runs a planned study: each run trains (evaluating at its end) through the trainer's own
code, in this process, unless it is done; a failure is recorded and the others go on.

A run whose `init_from` or `tower_checkpoints` run did not finish is not started (it fails
naming that run). A non-finite loss stops the trainer (`NonFiniteLossError`); a non-finite
score fails the run here. Both leave the other arms running.
"""
import math
import os
import time
import traceback
from typing import Any, Dict, Sequence

from absl import logging
import gin
import seqio

from omni_smola.evaluation import evaluator, tables
from omni_smola.studies import configure, markers
from omni_smola.studies.plan import Run
from omni_smola.studies.spec import Study
from omni_smola.training import program_cache


class RunFailedError(RuntimeError):
  """A run finished without usable scores."""


class StudyPreemptedError(RuntimeError):
  """A run stopped on SIGTERM (a preemption): the study stops too, to be run again."""


class StaleRunError(RuntimeError):
  """A finished run read other data than the study's tasks read now."""


def data_versions(mixture: str) -> Dict[str, str]:
  """{task: the TFDS dataset it reads, with its version} over a mixture's tasks (a source
  that is not TFDS: its class name)."""
  versions = {}
  for task in seqio.get_subtasks(seqio.get_mixture_or_task(mixture)):
    dataset = getattr(task.source, "tfds_dataset", None)
    versions[task.name] = dataset.name if dataset is not None else type(task.source).__name__
  return versions


def check_finished_runs_read_todays_data(runs: Sequence[Run], study_dir: str) -> None:
  """Refuses a study whose finished runs trained on another version of their data.

  A rerun skips finished runs; one trained on an older dataset (mini_vl 1.1.0 where the
  tasks now read 1.2.0) would put its old scores in today's tables without a word.
  """
  for run in runs:
    run_dir = os.path.join(study_dir, run.directory)
    record = markers.done(run_dir)
    if record is None:
      continue
    now = data_versions(run.mixture)
    if record.get("data") != now:
      recorded = record.get("data") or "nothing (written before runs recorded their data)"
      raise StaleRunError(
          f"{run.label} finished on other data than its tasks read now: its "
          f"{markers.DONE} records {recorded}, the tasks read {now}. Give the study a new "
          f"--study_dir, or delete {run_dir} (and the runs that start from it) to train it "
          "again.")


def _final_metrics(result, model_dir: str) -> Dict[str, Any]:
  """(step, {task: {metric: value}}) of the run's last evaluation.

  A run that finished training before (and so exits at once) is read from its
  MODEL_DIR/eval/metrics.json.
  """
  results = dict(result.eval_results)
  if not results and os.path.exists(os.path.join(model_dir, "eval", evaluator.METRICS_FILE)):
    results = {int(s): m for s, m in evaluator.read_metrics(
        os.path.join(model_dir, "eval")).items()}
  if not results:
    raise RunFailedError(f"{model_dir}: training did not evaluate (set EVAL_PERIOD > 0, e.g. "
                         "'%TRAIN_STEPS' in Study.bindings)")
  step = max(results)
  return step, results[step]


def scores_of(metrics: Dict[str, Dict[str, float]]) -> Dict[str, float]:
  """{task: its main metric} (the tables' choice); raises on a non-finite score."""
  scores = {task: values[tables.main_metric(values)] for task, values in metrics.items()}
  bad = {t: s for t, s in scores.items() if not math.isfinite(s)}
  if bad:
    raise RunFailedError(f"non-finite scores: {bad}")
  return scores


def _train(study: Study, run: Run, study_dir: str) -> Dict[str, Any]:
  from omni_smola.training import trainer  # pylint: disable=g-import-not-at-top
  gin_files, bindings = configure.run_config(study, run, study_dir)
  model_dir = os.path.join(study_dir, run.directory)
  start = time.time()
  configure.parse(gin_files, bindings)
  try:
    result = trainer.train()
  finally:
    gin.clear_config()
  if result.preempted:
    raise StudyPreemptedError(f"{run.label} was preempted at step {result.step}; run the "
                              "study again to resume it")
  step, metrics = _final_metrics(result, model_dir)
  return {"arm": run.arm.name, "seed": run.seed, "task": run.task, "step": step,
          "data": data_versions(run.mixture), "metrics": metrics, "scores": scores_of(metrics),
          "wall_seconds": time.time() - start,
          "config": configure.recorded_config(gin_files, bindings)}


def execute(study: Study, runs: Sequence[Run], study_dir: str) -> Dict[str, int]:
  """Trains what is not done; returns counts {'trained', 'skipped', 'failed'}.

  Runs share the programs of equal models and optimizers (`program_cache`): an arm's
  seeds and tasks trace and load their programs once.
  """
  with program_cache.shared_programs():
    return _execute(study, runs, study_dir)


def _execute(study: Study, runs: Sequence[Run], study_dir: str) -> Dict[str, int]:
  check_finished_runs_read_todays_data(runs, study_dir)
  counts = {"trained": 0, "skipped": 0, "failed": 0}
  for index, run in enumerate(runs):
    run_dir = os.path.join(study_dir, run.directory)
    prefix = f"[study] {index + 1}/{len(runs)} {run.label}"
    if markers.done(run_dir) is not None:
      logging.info("%s: done before, skipped", prefix)
      counts["skipped"] += 1
      continue
    source = next((r for r in run.dependencies
                   if markers.done(os.path.join(study_dir, r.directory)) is None), None)
    if source is not None:  # its checkpoint is missing or partial
      markers.write_failed(run_dir, {"error": f"not started: {source.label}, whose checkpoint "
                                              "it reads, did not finish"})
      logging.error("%s: not started, %s did not finish", prefix, source.label)
      counts["failed"] += 1
      continue
    logging.info("%s: training", prefix)
    try:
      record = _train(study, run, study_dir)
    except StudyPreemptedError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # A failed arm is reported and the others still run (the study's contract).
      markers.write_failed(run_dir, {"error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()})
      logging.error("%s: FAILED: %s: %s", prefix, type(e).__name__, e)
      counts["failed"] += 1
      continue
    markers.write_done(run_dir, record)
    logging.info("%s: done at step %d in %.0f s", prefix, record["step"], record["wall_seconds"])
    counts["trained"] += 1
  return counts
