"""A study's figures (matplotlib, Agg): the expert-count curve, per-task bars, and the
routing heat maps of the best routed arm.

* `expert_scaling.png`: delta to the specialists (or the mean score without a reference)
  of the `scaling_arms` against their experts per group, mean ± std over seeds (the
  Omni-SMoLA paper's Fig. 2 plots the average gain over the FT generalist likewise).
* `per_task.png`: one group of bars per task, one bar per arm, std as error bars.
* `routing/<arm>/figures/*.png`: `analysis.routing` of the best arm (by delta, else mean
  score) among the finished, non-per-task arms whose adapter has a router, on its first
  finished seed.
"""
import os
from typing import Any, List, Mapping, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position


def _headline(arm: Mapping[str, Any]) -> Optional[Mapping[str, float]]:
  return arm["delta"] or arm["mean_score"]


def _save(fig, ax, title: str, directory: str, file_name: str) -> str:
  """Titles a figure of seed statistics, writes it to `directory/file_name`, frees it."""
  ax.set_title(f"{title} (mean ± std over seeds)", fontsize=9)
  fig.tight_layout()
  path = os.path.join(directory, file_name)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def expert_scaling(summary: Mapping[str, Any], directory: str) -> Optional[str]:
  points = [(experts, _headline(summary["arms"][name]))
            for name, experts in summary["scaling_arms"].items()
            if name in summary["arms"] and _headline(summary["arms"][name])]
  if not points:
    return None
  points.sort(key=lambda p: p[0])
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points],
              yerr=[p[1]["std"] for p in points], marker="o", capsize=4)
  ax.set_xscale("log")
  ax.set_xticks([p[0] for p in points])
  ax.set_xticklabels([str(p[0]) for p in points])
  ax.set_xlabel("experts per group")
  with_reference = any(summary["arms"][n]["delta"] for n in summary["scaling_arms"]
                       if n in summary["arms"])
  ax.set_ylabel("δ to specialists" if with_reference else "mean score")
  return _save(fig, ax, f"{summary['study']}: expert count", directory, "expert_scaling.png")


def per_task(summary: Mapping[str, Any], directory: str) -> Optional[str]:
  arms = [n for n, a in summary["arms"].items() if a["tasks"]]
  tasks = summary["tasks"]
  if not arms:
    return None
  width = 0.8 / len(arms)
  fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) * max(1, len(arms) / 4)), 4))
  x = np.arange(len(tasks))
  for i, name in enumerate(arms):
    stats = [summary["arms"][name]["tasks"].get(t) for t in tasks]
    ax.bar(x + (i - (len(arms) - 1) / 2) * width,
           [s["mean"] if s else np.nan for s in stats], width,
           yerr=[s["std"] if s else 0.0 for s in stats], capsize=2, label=name)
  ax.set_xticks(x)
  ax.set_xticklabels([f"{t}\n({summary['metrics'].get(t, '')})" for t in tasks],
                     rotation=30, ha="right", fontsize=7)
  ax.set_ylabel("score")
  ax.legend(fontsize=6, ncol=2)
  return _save(fig, ax, f"{summary['study']}: per task", directory, "per_task.png")


def best_routed_arm(summary: Mapping[str, Any], per_task_arms) -> Optional[str]:
  """The best-scoring arm with a router (`routed`: the accounting's `routing.has_router`:
  a routed adapter, MoVE's tower router or MoME's MoLE)."""
  candidates = [(name, _headline(arm)["mean"]) for name, arm in summary["arms"].items()
                if name not in per_task_arms and _headline(arm) and arm.get("routed")]
  return max(candidates, key=lambda c: c[1])[0] if candidates else None


def figures(summary: Mapping[str, Any], directory: str) -> List[str]:
  os.makedirs(directory, exist_ok=True)
  return [p for p in (expert_scaling(summary, directory), per_task(summary, directory)) if p]
