"""MoVE's tower router over seeds (MoME's Fig. 5, with its spread).

Each arm named in `Study.tower_routing_arms` has every finished seed analysed
(`routing_maps`: `omni_smola.analysis.routing` on the run's final checkpoint, figures under
`routing/<arm>/seed_<s>/`), and the results gain, per task, each tower's mean router weight
as mean ± std over the seeds, and the seeds on which each tower is the task's most often
chosen one. One seed's map says little: in the mini MoME study, which tower won the banners
changed with every seed.
"""
import os
from typing import Any, Callable, Dict, List, Mapping, Sequence

import numpy as np

from omni_smola.studies import markers, routing_maps
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
                                 if int(np.argmax(f)) == i]}
        for i, tower in enumerate(towers)}
  return {"towers": list(towers), "seeds": [int(s) for s in analyses], "tasks": tasks}


def summarize(study: Study, runs: Sequence[Run], study_dir: str,
              analyse: Callable[..., Mapping[str, Any]] = routing_maps.routing_maps
              ) -> Dict[str, Any]:
  """{arm: its tower statistics, or {"error": ...}} for `study.tower_routing_arms`.

  Only finished runs are analysed; an arm none of whose seeds finished, or whose analysis
  fails, is reported with its error (the tables are the study's result, not this)."""
  summary = {}
  for name in study.tower_routing_arms:
    finished = [r for r in runs if r.arm.name == name
                and markers.done(os.path.join(study_dir, r.directory)) is not None]
    if not finished:
      summary[name] = {"error": "no finished seed"}
      continue
    try:
      analyses = {r.seed: analyse(study, r, study_dir, output_dir=seed_output_dir(study_dir, r))
                  ["towers"] for r in finished}
      summary[name] = _summarize_arm(analyses)
    except Exception as e:  # pylint: disable=broad-except
      summary[name] = {"error": f"{type(e).__name__}: {e}"}
  return summary


def markdown_lines(tower_routing: Mapping[str, Any]) -> List[str]:
  """A table per arm: task x tower, mean router weight ± std over seeds, and the seeds on
  which that tower is the task's most chosen."""
  lines = []
  for arm, record in tower_routing.items():
    if "error" in record:
      lines += ["", f"Tower routing of {arm}: not analysed ({record['error'][:300]})."]
      continue
    towers = record["towers"]
    lines += ["", f"Tower routing of {arm}: mean router weight per task, mean ± std over "
              f"seeds {record['seeds']}; in brackets, the seeds on which the tower is the "
              "task's most chosen (routing/<arm>/seed_<s>/).", "",
              "| task | " + " | ".join(towers) + " |", "|---|" + "---:|" * len(towers)]
    for task, per_tower in record["tasks"].items():
      cells = [f"{c['mean']:.2f} ± {c['std']:.2f} [{','.join(map(str, c['top_on_seeds']))}]"
               for c in (per_tower[t] for t in towers)]
      lines.append(f"| {task} | " + " | ".join(cells) + " |")
  return lines
