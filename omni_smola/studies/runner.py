"""A study from its gin config to results.json, results.md and figures.

validate everything (no training yet) -> train what is not done -> aggregate -> plot.
"""
import os
import time
from typing import Any, Dict

from absl import logging
import gin

from omni_smola.studies import execute, plan, plots, results, routing_maps, tower_weights
from omni_smola.studies import validate
from omni_smola.studies.spec import Study, StudyConfigError


def configured_study(quick: bool) -> Study:
  """The Study gin binds (after the study's gin files are parsed), `--quick` applied."""
  try:
    study = Study()
  except (TypeError, ValueError, RuntimeError) as e:
    raise StudyConfigError(f"the gin files configure no complete Study: {e}") from None
  finally:
    gin.clear_config()  # each run parses its own configuration
  return plan.quick(study) if quick else study


def prepare(study: Study, study_dir: str, account: bool = True):
  """(runs, tasks, accounts) after every check; nothing trains. Without `account`, each
  arm's model is configured but not traced (no parameter or FLOP counts)."""
  tasks = validate.study_tasks(study)
  runs = plan.plan(study, tasks)
  accounts = validate.validate(study, runs, study_dir, account)
  logging.info("[study] %s: %d arms, %d runs, tasks %s: valid", study.name, len(study.arms),
               len(runs), ", ".join(tasks))
  return runs, tasks, accounts


def run_study(study: Study, study_dir: str, quick: bool = False) -> Dict[str, Any]:
  """Runs the study in `study_dir`; returns the summary written to results.json."""
  start = time.time()
  study_dir = os.path.abspath(study_dir)
  runs, tasks, accounts = prepare(study, study_dir)
  counts = execute.execute(study, runs, study_dir)
  summary = results.summarize(study, runs, study_dir, tasks, accounts, quick)
  figure_dir = os.path.join(study_dir, "figures")
  figures = plots.figures(summary, figure_dir)
  per_task_arms = {a.name for a in study.arms if a.per_task}
  best = plots.best_routed_arm(summary, per_task_arms)
  summary["routing"] = None
  if best is not None:
    seed = next(s for s, v in summary["arms"][best]["seeds"].items() if v["status"] == "done")
    run = next(r for r in runs if r.arm.name == best and str(r.seed) == seed)
    try:
      analysis = routing_maps.routing_maps(study, run, study_dir)
      figures += [os.path.join(analysis["output_dir"], p) for p in analysis["figures"]]
      summary["routing"] = {"arm": best, "seed": int(seed), "output_dir": analysis["output_dir"]}
    except Exception as e:  # pylint: disable=broad-except
      # The tables are the study's result; a failed analysis is reported, not fatal.
      logging.error("[study] routing analysis of %s failed: %s: %s", best, type(e).__name__, e)
      summary["routing"] = {"arm": best, "error": f"{type(e).__name__}: {e}"}
    finally:
      gin.clear_config()
  summary["tower_routing"] = tower_weights.summarize(study, runs, study_dir)
  summary.update(figures=[os.path.relpath(p, study_dir) for p in figures], runs=counts,
                 wall_seconds=time.time() - start)
  results.write(summary, study_dir)
  logging.info("[study] %s: %d trained, %d skipped, %d failed in %.0f s -> %s", study.name,
               counts["trained"], counts["skipped"], counts["failed"], time.time() - start,
               study_dir)
  return summary
