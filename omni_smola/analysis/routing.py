"""Routing analysis of a checkpoint: what `python -m omni_smola.analyze` runs.

Restores a checkpoint (adapters required), runs up to `num_batches` batches of
each task of the mixture (or of the task) through the model with the
`intermediates` collection mutable, sums the adapters' sown statistics per task
(by each example's `task_id`), adapted projection, layer and expert group, and
writes

    <output_dir>/routing.json          the summary (see aggregate.py for its fields)
    <output_dir>/figures/*.png         heat maps and the entropy plot (figures.py)

A MoME model (`PaliConfig.move`) adds MoVE's tower router per task (`tower_routing.py`,
`routing.json`'s `towers`, `figures/tower_selection.png`) and, with MoME's MoLE, its expert
use per task and layer (`layers`' `mome_mole` group, `figures/mole_experts_<stack>.png`).
"""
import json
import os
from typing import Any, Dict, Optional, Sequence

from absl import logging
import gin
import jax
import numpy as np

from omni_smola import param_layout
from omni_smola.analysis import aggregate, collect, figures, tower_routing
from omni_smola.training import checkpointing, data_iterator, partitioned_step, trainer

ROUTED_KINDS = ("smola", "omni_smola", "mixlora", "mole")  # the kinds that sow statistics


def default_output_dir(checkpoint_path: str, step_dir: str, step: int) -> str:
  """MODEL_DIR/analysis/<step> for a run's checkpoint, else <path>/analysis."""
  parent = os.path.dirname(os.path.normpath(step_dir))
  if os.path.basename(parent) == checkpointing.CHECKPOINTS_SUBDIR:
    return os.path.join(os.path.dirname(parent), "analysis", str(step))
  return os.path.join(checkpoint_path, "analysis")


def restore(model, checkpoint_path: str, dataset_cfg, partitioner):
  """(params placed with their shardings, their shardings)."""
  abstract = partitioned_step.abstract_variables(model,
                                                 trainer.input_shapes(model, dataset_cfg))
  sharding = partitioner.variables_sharding(abstract)["params"]
  target = partitioned_step.with_sharding(param_layout.unbox(abstract["params"]), sharding)
  params = checkpointing.restore_params(checkpoint_path, target, require_adapters=True)
  return params, sharding


def _host(value) -> np.ndarray:
  """A replicated array's value (also when other processes hold copies)."""
  if hasattr(value, "addressable_data"):
    return np.asarray(value.addressable_data(0))
  return np.asarray(value)


def mome_tower_router(model) -> Optional[Sequence[str]]:
  """MoVE's tower names when the model routes over towers (fusion 'router'), else None."""
  move = getattr(model.config, "move", None)
  return list(move.tower_names) if move is not None and move.fusion == "router" else None


def has_mome_mole(model) -> bool:
  """Whether the text model has MoME's MoLE with a router (more than one expert)."""
  mole = getattr(getattr(model.config, "text", None), "mome_mole", None)
  return mole is not None and mole.num_experts > 1


def has_router(model) -> bool:
  """Whether `analyze` has a router of `model` to analyse: a routed adapter kind, MoVE's
  tower router or MoME's MoLE (the study runner picks its routed arms by it)."""
  return (getattr(model.adapters.adapter, "kind", None) in ROUTED_KINDS
          or mome_tower_router(model) is not None or has_mome_mole(model))


@gin.configurable
def analyze(*, model, checkpoint_path: str, dataset_cfg: data_iterator.DatasetConfig,
            num_batches: Optional[int] = 4, output_dir: Optional[str] = None,
            partitioner: Optional[partitioned_step.Partitioner] = None, top_k: int = 3,
            make_figures: bool = True) -> Dict[str, Any]:
  """Analyses the routing of the checkpoint at `checkpoint_path`; returns the summary.

  Args:
    model: the `PaliModel` the checkpoint was trained as (its gin config).
    checkpoint_path: CHECKPOINT_PATH: a MODEL_DIR, its `checkpoints/` or a step dir.
    dataset_cfg: the task or mixture, split, lengths and batch size to run.
    num_batches: batches per task (None: the whole split).
    output_dir: default MODEL_DIR/analysis/<step>.
    top_k: how many top experts the summary names per task.
  """
  kind = getattr(model.adapters.adapter, "kind", None)
  towers = mome_tower_router(model)
  if not has_router(model):
    raise ValueError(f"adapter kind {kind!r} has no router to analyse (routed kinds: "
                     f"{ROUTED_KINDS}; or a MoME model with MoVEConfig.fusion='router' or "
                     "MoLE experts); pass the model and adapter configs the checkpoint was "
                     "trained with")
  data_iterator.check_registered(dataset_cfg.mixture_or_task_name, dataset_cfg.module)
  step_dir = checkpointing.resolve_checkpoint(checkpoint_path)
  step = checkpointing.step_of(step_dir)
  output_dir = output_dir or default_output_dir(checkpoint_path, step_dir, step)
  partitioner = partitioner if partitioner is not None else partitioned_step.Partitioner()
  data_iterator.check_batch_size(dataset_cfg.batch_size, partitioner.data_parallel_size)
  params, params_sharding = restore(model, step_dir, dataset_cfg, partitioner)

  image_size = trainer.image_size_of(model)
  tasks = collect.leaf_tasks(dataset_cfg.mixture_or_task_name)
  accumulator = aggregate.RoutingAccumulator()
  tower_accumulator = tower_routing.TowerAccumulator(towers) if towers else None
  jitted = None
  for task in tasks:
    count = 0
    for batch in collect.task_batches(dataset_cfg, task, image_size, num_batches,
                                      model.config.pix2struct_patching):
      if jitted is None:
        jitted = partitioned_step.jit_params_fn(
            partitioner, lambda p, b: collect.routing_statistics(model, p, b),
            params_sharding, partitioner.batch_sharding(batch))
      stats = jitted(params, partitioner.global_batch(batch, dataset_cfg.batch_size))
      stats = {k: _host(v) for k, v in stats.items()}
      accumulator.add(stats)
      if tower_accumulator is not None:
        tower_accumulator.add(stats)
      count += 1
    if not count:
      logging.warning("task %s has no %s examples: skipped", task, dataset_cfg.split)
  summary = accumulator.summarize(top_k)
  if tower_accumulator is not None:
    summary["towers"] = tower_accumulator.summarize()
  summary.update(checkpoint=step_dir, step=step, adapter=kind,
                 mixture_or_task_name=dataset_cfg.mixture_or_task_name,
                 split=dataset_cfg.split, batches_per_task=num_batches,
                 task_feature_lengths=dict(dataset_cfg.task_feature_lengths))
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    if make_figures:
      figure_dir = os.path.join(output_dir, "figures")
      paths = figures.load_heatmaps(summary, figure_dir)
      if summary["layers"]:
        paths.append(figures.entropy_per_layer(summary, figure_dir))
      paths += figures.mole_expert_use(summary, figure_dir)
      if "towers" in summary:
        paths.append(figures.tower_selection(summary["towers"], figure_dir))
    summary["figures"] = [os.path.relpath(p, output_dir) for p in paths]
    with open(os.path.join(output_dir, "routing.json"), "w") as f:
      json.dump(summary, f, indent=1)
    logging.info("Routing analysis of %s (step %d): %d tasks, %d layers -> %s", step_dir,
                 step, len(summary["tasks"]), len(summary["layers"]), output_dir)
  summary["output_dir"] = output_dir
  return summary
