"""MoVE's tower router over seeds (MoME's Fig. 5, with its spread).

Each arm named in `Study.tower_routing_arms` has every finished seed analysed
(`routing_maps`: `omni_smola.analysis.routing` on the run's final checkpoint, figures under
`routing/<arm>/seed_<s>/`), and the results gain, per task, each tower's mean router weight
as mean ± std over the seeds (sample std, as every study table), and the seeds on which
each tower is the task's most often chosen one (every tower tied for most, on a tie). One
seed's map says little: in the mini MoME study, which tower won the banners changed with
every seed.
"""
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from omni_smola.studies import markers
from omni_smola.studies.plan import Run
from omni_smola.studies.spec import Study
from omni_smola.studies.spread import mean_std


def seed_output_dir(study_dir: str, run: Run) -> str:
  return os.path.join(study_dir, "routing", run.arm.name, f"seed_{run.seed}")


def _summarize_arm(analyses: Mapping[int, Mapping[str, Any]]) -> Dict[str, Any]:
  """{seed: the analysis' `towers` record} -> towers, seeds, per-task statistics."""
  records = list(analyses.values())
  towers = records[0]["towers"]
  tasks = {}
  for task in records[0]["tasks"]:
    weights = np.array([r["tasks"][task]["mean_weight"] for r in records])  # [seeds, towers]
    frequencies = np.array([r["tasks"][task]["selection_frequency"] for r in records])
    tasks[task] = {
        tower: {**mean_std(weights[:, i]),
                "top_on_seeds": [int(s) for s, f in zip(analyses, frequencies)
                                 if f[i] == f.max()]}
        for i, tower in enumerate(towers)}
  return {"towers": list(towers), "seeds": [int(s) for s in analyses], "tasks": tasks}


def summarize(study: Study, runs: Sequence[Run], study_dir: str,
              analyse: Optional[Callable[..., Mapping[str, Any]]] = None) -> Dict[str, Any]:
  """{arm: its tower statistics} for `study.tower_routing_arms`.

  Only finished runs are analysed. A seed whose analysis fails is left out and its error
  recorded (`errors`); an arm with no analysed seed has only its errors (the tables are the
  study's result, not this). `analyse`: `routing_maps.routing_maps` unless given."""
  if analyse is None:
    from omni_smola.studies import routing_maps  # pylint: disable=g-import-not-at-top
    analyse = routing_maps.routing_maps
  summary = {}
  for name in study.tower_routing_arms:
    finished = [r for r in runs if r.arm.name == name
                and markers.done(os.path.join(study_dir, r.directory)) is not None]
    analyses, errors = {}, {}
    for run in finished:
      try:
        analyses[run.seed] = analyse(study, run, study_dir,
                                     output_dir=seed_output_dir(study_dir, run))["towers"]
      except Exception as e:  # pylint: disable=broad-except
        errors[str(run.seed)] = f"{type(e).__name__}: {e}"
    if not finished:
      errors["all"] = "no finished seed"
    summary[name] = dict(_summarize_arm(analyses) if analyses else {}, errors=errors)
  return summary


def _cell(stats: Mapping[str, Any]) -> str:
  spread = f" ± {stats['std']:.2f}" if stats["n"] > 1 else ""
  top = f" [{','.join(map(str, stats['top_on_seeds']))}]" if stats["top_on_seeds"] else ""
  return f"{stats['mean']:.2f}{spread}{top}"


def markdown_lines(tower_routing: Mapping[str, Any]) -> List[str]:
  """A table per arm: task x tower, mean router weight ± std over seeds, and the seeds on
  which that tower is the task's most chosen; then any seed not analysed, with its error."""
  lines = []
  for arm, record in tower_routing.items():
    if "towers" in record:
      towers = record["towers"]
      lines += ["", f"Tower routing of {arm}: mean router weight per task, mean ± std over "
                f"seeds {record['seeds']} (one seed: no spread); in brackets, the seeds on "
                "which the tower is the task's most chosen (routing/<arm>/seed_<s>/).", "",
                "| task | " + " | ".join(towers) + " |", "|---|" + "---:|" * len(towers)]
      for task, per_tower in record["tasks"].items():
        lines.append(f"| {task} | " + " | ".join(_cell(per_tower[t]) for t in towers) + " |")
    for seed, error in record["errors"].items():
      lines.append(f"\nTower routing of {arm}, seed {seed}: not analysed ({error[:300]}).")
  return lines
