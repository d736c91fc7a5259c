"""Summing per-example routing statistics by task, site, layer and expert group.

Sums, not means, are accumulated (`expert_load` is a per-example sum over tokens),
so every average is exact over however many batches: the load fraction of expert
e is `sum load_e / sum tokens`, the entropy per token `sum entropy / sum tokens`.
A layer's numbers pool its adapted projections (q, k, v, out, wi_0, ...).
"""
import math
import re
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from omni_smola.analysis.collect import ROW_VALID, TOWER_WEIGHTS, split_key
from omni_smola.data import task_ids

# `text/encoder/layers_3/mlp/wi_0` -> `text/encoder/layers_3`; ViT blocks likewise.
LAYER_PATTERN = re.compile(r"^(.*?/(?:layers|encoderblock)_\d+)(/|$)")
STACK_ORDER = ("img", "encoder", "decoder")


def layer_of(site: str) -> str:
  match = LAYER_PATTERN.match(site)
  return match.group(1) if match else site


def layer_sort_key(layer: str):
  """Vision blocks, then encoder layers, then decoder layers, each by index."""
  stack = next((i for i, s in enumerate(STACK_ORDER) if re.search(rf"(^|/){s}(/|$)", layer)),
               len(STACK_ORDER))
  index = re.search(r"_(\d+)$", layer)
  return (stack, int(index.group(1)) if index else -1, layer)


def row_tasks(stats: Mapping[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray, Dict[int, str]]:
  """(valid rows [b], each row's task name [b] ('' for padding), {task id: name})."""
  rows = np.asarray(stats[ROW_VALID]).astype(bool)
  ids = np.asarray(stats["task_id"]).reshape(-1)
  names = {int(i): task_ids.task_name(int(i)) for i in np.unique(ids[rows])}
  per_row = np.array([names.get(int(i), "") for i in ids])
  return rows, per_row, names


class _Sums:
  """Running sums of one (task, site or layer, group)."""

  def __init__(self, num_experts: int):
    self.load = np.zeros(num_experts, np.float64)
    self.tokens = 0.0
    self.entropy = 0.0
    self.max_weight = 0.0
    self.examples = 0

  def add(self, other: "_Sums") -> None:
    self.load += other.load
    self.tokens += other.tokens
    self.entropy += other.entropy
    self.max_weight += other.max_weight
    self.examples += other.examples

  def summary(self, top_k: int) -> Dict[str, Any]:
    tokens = max(self.tokens, 1e-12)
    fraction = self.load / tokens if self.tokens else np.zeros_like(self.load)
    top = np.argsort(-fraction, kind="stable")[:top_k]
    experts = len(self.load)
    entropy = self.entropy / tokens if self.tokens else 0.0
    return {
        "tokens": self.tokens,
        "load": self.load.tolist(),
        "load_fraction": fraction.tolist(),
        "entropy_per_token": entropy,
        # 1 is uniform routing over the group's experts, 0 one expert per token.
        "normalized_entropy": entropy / math.log(experts) if experts > 1 else 0.0,
        "max_weight_mean": self.max_weight / self.examples if self.examples else 0.0,
        "top_experts": [{"expert": int(e), "fraction": float(fraction[e])} for e in top],
    }


class RoutingAccumulator:
  """Adds up batches of `collect.routing_statistics` (host numpy arrays) by task."""

  def __init__(self):
    self._sums: Dict[Tuple[str, str, str], _Sums] = {}
    self.examples: Dict[str, int] = {}
    self.task_ids: Dict[str, int] = {}

  def add(self, stats: Mapping[str, np.ndarray]) -> None:
    rows, per_row, names = row_tasks(stats)
    for name in names.values():
      self.examples[name] = self.examples.get(name, 0) + int(np.sum(rows & (per_row == name)))
      self.task_ids[name] = task_ids.task_id(name)
    by_entry: Dict[Tuple[str, str], Dict[str, np.ndarray]] = {}
    for key, value in stats.items():
      if key in ("task_id", ROW_VALID, TOWER_WEIGHTS):
        continue
      site, group, stat = split_key(key)
      by_entry.setdefault((site, group), {})[stat] = np.asarray(value, np.float64)
    for (site, group), values in by_entry.items():
      for name in names.values():
        chosen = rows & (per_row == name)
        load = values["expert_load"][chosen]
        entry = self._sums.setdefault((name, site, group), _Sums(load.shape[-1]))
        entry.load += load.sum(axis=0)
        entry.tokens += float(values["token_count"][chosen].sum())
        entry.entropy += float(values["routing_entropy"][chosen].sum())
        entry.max_weight += float(values["max_weight"][chosen].sum())
        entry.examples += int(chosen.sum())

  def summarize(self, top_k: int = 3) -> Dict[str, Any]:
    """{'tasks', 'sites', 'layers'}; each site/layer: group -> per task and 'all'."""
    tasks = sorted(self.examples)
    sites: Dict[str, Dict[str, Dict[str, _Sums]]] = {}
    layers: Dict[str, Dict[str, Dict[str, _Sums]]] = {}
    for (task, site, group), sums in self._sums.items():
      for table, name in ((sites, site), (layers, layer_of(site))):
        groups = table.setdefault(name, {}).setdefault(group, {})
        for bucket in (task, "all"):
          groups.setdefault(bucket, _Sums(len(sums.load))).add(sums)

    def render(table, order):
      out = {}
      for name in sorted(table, key=order):
        out[name] = {}
        for group, buckets in table[name].items():
          out[name][group] = {
              "experts": len(buckets["all"].load),
              "tasks": {t: buckets[t].summary(top_k) for t in tasks if t in buckets},
              "all": buckets["all"].summary(top_k)}
      return out

    return {
        "tasks": {t: {"task_id": self.task_ids[t], "examples": self.examples[t]}
                  for t in tasks},
        "sites": render(sites, lambda s: (layer_sort_key(layer_of(s)), s)),
        "layers": render(layers, layer_sort_key),
    }


def groups_in(summary: Mapping[str, Any]) -> List[str]:
  order = {"mm": 0, "vis": 1, "txt": 2}
  found = {g for layer in summary["layers"].values() for g in layer}
  return sorted(found, key=lambda g: (order.get(g, len(order)), g))
