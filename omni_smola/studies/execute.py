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

from omni_smola.evaluation import evaluator, tables
from omni_smola.studies import configure, markers
from omni_smola.studies.plan import Run
from omni_smola.studies.spec import Study
from omni_smola.training import program_cache


class RunFailedError(RuntimeError):
  """A run finished without usable scores."""


class StudyPreemptedError(RuntimeError):
  """A run stopped on SIGTERM (a preemption): the study stops too, to be run again."""


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
          "metrics": metrics, "scores": scores_of(metrics),
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
