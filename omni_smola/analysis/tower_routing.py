"""MoVE's tower router per task: which vision tower each task's instructions choose.

MoME (Fig. 5) shows that the instruction router sends each task to the vision experts that
suit it (documents to Pix2Struct, ...). Here, per task, over the analysed examples:

* `mean_weight[i]`: the mean router weight `G(I)_i` of tower i (a softmax, so a row sums
  to one);
* `selection_frequency[i]`: the share of examples whose largest weight is tower i's (the
  tower "selected"; also sums to one).

Sums are accumulated, so the means are exact over any number of batches; padded rows
never count (`aggregate.row_tasks`).
"""
from typing import Any, Dict, Mapping, Sequence

import numpy as np

from omni_smola.analysis.aggregate import row_tasks
from omni_smola.analysis.collect import TOWER_WEIGHTS


class TowerAccumulator:
  """Adds up `collect.routing_statistics`' `tower_weights` [b, towers] by task."""

  def __init__(self, tower_names: Sequence[str]):
    self.tower_names = list(tower_names)
    self._weights: Dict[str, np.ndarray] = {}
    self._selected: Dict[str, np.ndarray] = {}
    self._examples: Dict[str, int] = {}

  def add(self, stats: Mapping[str, np.ndarray]) -> None:
    weights = np.asarray(stats[TOWER_WEIGHTS], np.float64)  # [b, towers]
    if weights.shape[-1] != len(self.tower_names):
      raise ValueError(f"tower_weights has {weights.shape[-1]} columns for the towers "
                       f"{self.tower_names}")
    rows, per_row, names = row_tasks(stats)
    chosen = np.eye(len(self.tower_names))[np.argmax(weights, axis=-1)]  # [b, towers]
    for name in names.values():
      picked = rows & (per_row == name)
      zero = np.zeros(len(self.tower_names))
      self._weights[name] = self._weights.get(name, zero) + weights[picked].sum(axis=0)
      self._selected[name] = self._selected.get(name, zero) + chosen[picked].sum(axis=0)
      self._examples[name] = self._examples.get(name, 0) + int(picked.sum())

  def summarize(self) -> Dict[str, Any]:
    """{'towers': names, 'tasks': {task: {examples, mean_weight, selection_frequency}}}."""
    def entry(weights, selected, examples):
      return {"examples": examples, "mean_weight": (weights / examples).tolist(),
              "selection_frequency": (selected / examples).tolist()}

    tasks = {t: entry(self._weights[t], self._selected[t], n)
             for t, n in sorted(self._examples.items()) if n}
    total = sum(self._examples.values())
    pooled = (entry(sum(self._weights.values()), sum(self._selected.values()), total)
              if total else None)
    return {"towers": self.tower_names, "tasks": tasks, "all": pooled}
