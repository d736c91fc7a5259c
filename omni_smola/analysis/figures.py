"""PNG figures of a routing summary (matplotlib, Agg: no display needed).

* `load_<group>_<layer>.png`: a task x expert heat map of the load fraction (the
  share of the task's tokens each expert of the group receives, pooled over the
  layer's adapted projections); rows sum to one.
* `entropy_per_layer.png`: per group, the routing entropy per token of every
  layer, normalised by log(experts) (1: uniform over experts, 0: one expert
  per token), one line per task and the pooled mean.
* MoME: `tower_selection.png`, a task x tower heat map of MoVE's mean router weight beside
  the share of examples whose largest weight is each tower (MoME's Fig. 5; rows sum to one);
  `mole_experts_<stack>.png`, one task x expert panel of MoLE's expert use per layer of the
  encoder and of the decoder (the share of the task's examples routed to each expert).
"""
import os
import re
from typing import Any, List, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from omni_smola.analysis.aggregate import groups_in  # pylint: disable=wrong-import-position

MOME_MOLE = "mome_mole"  # MoME's MoLE's group (param_layout.ADDED_MODULES)


def slug(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")


def _short(layer: str) -> str:
  return re.sub(r"^text/", "", layer).replace("Transformer/", "")


def load_heatmaps(summary: Mapping[str, Any], directory: str) -> List[str]:
  """One heat map per (group, layer); returns the paths written.

  MoME's MoLE (group `mome_mole`) is drawn per stack instead (`mole_expert_use`).
  """
  os.makedirs(directory, exist_ok=True)
  tasks = list(summary["tasks"])
  paths = []
  for layer, groups in summary["layers"].items():
    for group, table in groups.items():
      if group == MOME_MOLE:
        continue
      rows = [t for t in tasks if t in table["tasks"]]
      matrix = np.array([table["tasks"][t]["load_fraction"] for t in rows])
      experts = table["experts"]
      fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * experts + 3.0),
                                      max(2.0, 0.4 * len(rows) + 1.5)))
      image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0,
                        vmax=max(float(matrix.max()), 1e-6))
      ax.set_xticks(range(experts))
      ax.set_xticklabels([str(e) for e in range(experts)], fontsize=7)
      ax.set_yticks(range(len(rows)))
      ax.set_yticklabels(rows, fontsize=7)
      ax.set_xlabel(f"{group} expert")
      ax.set_title(f"{_short(layer)}: load fraction of the {group} experts", fontsize=9)
      fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
      fig.tight_layout()
      path = os.path.join(directory, f"load_{slug(group)}_{slug(_short(layer))}.png")
      fig.savefig(path, dpi=100)
      plt.close(fig)
      paths.append(path)
  return paths


def entropy_per_layer(summary: Mapping[str, Any], directory: str) -> str:
  """Normalised routing entropy per layer, a panel per group; returns the path."""
  os.makedirs(directory, exist_ok=True)
  groups = groups_in(summary)
  tasks = list(summary["tasks"])
  fig, axes = plt.subplots(len(groups), 1, figsize=(10, 2.8 * len(groups)), squeeze=False)
  for ax, group in zip(axes[:, 0], groups):
    layers = [l for l, g in summary["layers"].items() if group in g]
    x = np.arange(len(layers))
    for task in tasks:
      values = [summary["layers"][l][group]["tasks"].get(task, {}).get("normalized_entropy",
                                                                        np.nan)
                for l in layers]
      ax.plot(x, values, marker=".", linewidth=0.8, alpha=0.7, label=task)
    pooled = [summary["layers"][l][group]["all"]["normalized_entropy"] for l in layers]
    ax.plot(x, pooled, color="black", linewidth=2.0, label="all tasks")
    ax.set_xticks(x)
    ax.set_xticklabels([_short(l) for l in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("entropy / log(experts)")
    ax.set_title(f"{group}: routing entropy per token", fontsize=9)
  axes[0, 0].legend(fontsize=6, ncol=3, loc="lower left")
  fig.tight_layout()
  path = os.path.join(directory, "entropy_per_layer.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _task_heatmap(ax, matrix, rows, columns, title, xlabel):
  image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
  ax.set_xticks(range(len(columns)))
  ax.set_xticklabels(columns, fontsize=7, rotation=30, ha="right")
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels(rows, fontsize=7)
  ax.set_xlabel(xlabel, fontsize=8)
  ax.set_title(title, fontsize=9)
  for (i, j), value in np.ndenumerate(matrix):
    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
            color="white" if value < 0.5 else "black")
  return image


def tower_selection(towers: Mapping[str, Any], directory: str) -> str:
  """MoVE's router per task (`tower_routing.TowerAccumulator.summarize()`); returns the path."""
  os.makedirs(directory, exist_ok=True)
  tasks = list(towers["tasks"])
  names = towers["towers"]
  fig, axes = plt.subplots(1, 2, figsize=(4.0 + 1.6 * len(names), 1.5 + 0.35 * len(tasks)),
                           squeeze=False)
  for ax, (field, title) in zip(axes[0], (("mean_weight", "mean router weight"),
                                          ("selection_frequency", "selected (largest weight)"))):
    matrix = np.array([towers["tasks"][t][field] for t in tasks])
    image = _task_heatmap(ax, matrix, tasks, names, title, "vision tower")
  axes[0, 1].set_yticklabels([])  # the same tasks: the left panel's labels name them
  fig.colorbar(image, ax=axes[0].tolist(), fraction=0.046, pad=0.04)
  path = os.path.join(directory, "tower_selection.png")
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path


def mole_expert_use(summary: Mapping[str, Any], directory: str, group: str = MOME_MOLE
                    ) -> List[str]:
  """One figure per text stack with MoLE layers, a task x expert panel per layer."""
  os.makedirs(directory, exist_ok=True)
  tasks = list(summary["tasks"])
  stacks: dict = {}
  for layer, groups in summary["layers"].items():
    if group in groups:
      stack = "decoder" if re.search(r"(^|/)decoder/", layer) else "encoder"
      stacks.setdefault(stack, []).append(layer)
  paths = []
  for stack, layers in stacks.items():
    fig, axes = plt.subplots(1, len(layers), squeeze=False,
                             figsize=(1.0 + 2.6 * len(layers), 1.5 + 0.35 * len(tasks)))
    for ax, layer in zip(axes[0], layers):
      table = summary["layers"][layer][group]
      rows = [t for t in tasks if t in table["tasks"]]
      matrix = np.array([table["tasks"][t]["load_fraction"] for t in rows])
      image = _task_heatmap(ax, matrix, rows, [str(e) for e in range(table["experts"])],
                            _short(layer), "MoLE expert")
      if ax is not axes[0, 0]:
        ax.set_yticklabels([])
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.046, pad=0.04)
    fig.suptitle(f"MoLE expert use per task, {stack}", fontsize=10)
    path = os.path.join(directory, f"mole_experts_{stack}.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths.append(path)
  return paths
