"""What a study is, as gin binds it: arms (training recipes) x seeds, and how to report them.

An arm is one row of the results table: experiment gin files plus bindings, run once per
seed (and, for a per-task arm such as the specialists, once per task of the study's
mixture). An arm may start from another arm's checkpoint (`init_from`), which makes that
arm a dependency: the runner trains it first, seed by seed.

    omni_smola.studies.spec.Study:
      name = 'mini_table3'
      mixture = 'mini_generalist'
      seeds = [0, 1, 2]
      arms = [@lora4/omni_smola.studies.spec.Arm(), ...]
    lora4/omni_smola.studies.spec.Arm:
      name = 'lora_r4'
      gin_files = ['experiments/mini_generalist_lora.gin']
      init_from = 'ft'
"""
import dataclasses
from typing import Any, Mapping, Optional, Sequence

import gin


class StudyConfigError(ValueError):
  """A study that cannot run as configured; raised before any training starts."""


@gin.configurable(module="omni_smola.studies.spec")
@dataclasses.dataclass(frozen=True)
class Arm:
  """One recipe of the study.

  Attributes:
    name: the row's name and its run directory (`<study_dir>/<name>/seed_<s>`).
    gin_files: the training experiment's gin files (as `--gin_file`).
    bindings: gin bindings on top, {NAME: value}; a string value starting with '%' or
      '@' is a gin reference (`{'EVAL_PERIOD': '%TRAIN_STEPS'}`), anything else a literal.
    init_from: another arm whose checkpoint (same seed, or its only seed) becomes
      INITIAL_CHECKPOINT_PATH.
    tower_checkpoints: MoME's frozen vision towers from other arms (tower-pretraining
      stages), `{tower: arm}` or `{tower: (arm, subtree)}`: the runner binds
      VISION_TOWER_CHECKPOINTS to each arm's run directory of the same seed (or its only
      seed), read at `vision_towers/<tower>/` or at `subtree`, and trains those arms first.
    per_task: one run per task of the study's mixture, trained on that task alone (a
      specialist); its score on a task is that task's run.
    mixture: the training mixture; default the study's (ignored by per-task arms).
    seeds: default the study's; a stage shared by every seed of its dependents (a
      backbone) names one seed.
    report: a row of the results; False for a stage that only feeds other arms.
  """
  name: str = gin.REQUIRED
  gin_files: Sequence[str] = gin.REQUIRED
  bindings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  init_from: Optional[str] = None
  tower_checkpoints: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  per_task: bool = False
  mixture: Optional[str] = None
  seeds: Optional[Sequence[int]] = None
  report: bool = True


@gin.configurable(module="omni_smola.studies.spec")
@dataclasses.dataclass(frozen=True)
class Study:
  """The arms, the seeds and what the results compare.

  Attributes:
    name: the study's name (default run directory `runs/studies/<name>`).
    arms: the `Arm`s, in any order that respects `init_from`.
    mixture: what every arm is evaluated on (its leaf tasks are the table's columns) and
      what the generalist arms train on.
    seeds: RANDOM_SEED of each repetition; at least one.
    task_modules: MIXTURE_OR_TASK_MODULE of every run (the modules registering the tasks).
    bindings: gin bindings every arm gets before its own (eval sizes, checkpoint period).
    reference_arm: the per-task specialists that delta is measured against (the paper's
      Table 3); None: no delta column.
    scaling_arms: {arm: experts per group} drawn as the expert-count curve (Fig. 2).
    comparisons: {claim: (arm A, arm B)}: each claim says A scores above B. results.md
      gives A's mean score minus B's per seed (paired by seed; an arm with one seed, a
      shared backbone, is paired with every seed of the other), its mean ± std, and whether
      the claim holds beyond that spread.
    routing_batches: batches per task of the routing analysis of the best routed arm.
    tower_routing_arms: arms with MoVE's tower router whose every finished seed is
      analysed; results give each task's router weight per tower, mean ± std over seeds
      (MoME's Fig. 5; studies/tower_weights.py).
    quick_bindings: `--quick`: bindings every arm gets last (few steps, small evaluations).
    quick_name_suffix: `--quick`: appended to every mixture and task name (the mini
      mixture's `_tiny` data config).
  """
  name: str = gin.REQUIRED
  arms: Sequence[Arm] = gin.REQUIRED
  mixture: str = gin.REQUIRED
  seeds: Sequence[int] = gin.REQUIRED
  task_modules: Any = "tasks"
  bindings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  reference_arm: Optional[str] = None
  scaling_arms: Mapping[str, int] = dataclasses.field(default_factory=dict)
  comparisons: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  routing_batches: int = 2
  tower_routing_arms: Sequence[str] = ()
  quick_bindings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  quick_name_suffix: str = ""


def _is_reference(value: Any) -> bool:
  return isinstance(value, str) and value[:1] in ("%", "@")


def _holds_reference(value: Any) -> bool:
  if isinstance(value, (tuple, list)):
    return any(_holds_reference(v) for v in value)
  if isinstance(value, dict):
    return any(_holds_reference(v) for v in value.values())
  return _is_reference(value)


def gin_value(value: Any) -> str:
  """`value` as gin text; a '%MACRO' or '@ref()' string, also inside a tuple, list or
  dict value, stays a reference (`(('dinov2', '@DinoV2Config()'),)` binds a tower config).
  A value without one is its repr, as before references could nest."""
  if not _holds_reference(value):
    return repr(value)
  if _is_reference(value):
    return value
  if isinstance(value, dict):
    return "{" + ", ".join(f"{k!r}: {gin_value(v)}" for k, v in value.items()) + "}"
  items = [gin_value(v) for v in value]
  if isinstance(value, list):
    return "[" + ", ".join(items) + "]"
  return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def gin_binding(name: str, value: Any) -> str:
  """`NAME = value` for gin (`gin_value`: '%MACRO' and '@ref()' strings stay references)."""
  return f"{name} = {gin_value(value)}"
