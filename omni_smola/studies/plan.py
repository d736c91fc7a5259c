"""A study expanded into runs: one per (arm, seed[, task]), in dependency order.

Everything here is checked from the study's own fields, before gin parses any arm:
names and run directories are unique, seed lists are non-empty, `init_from` names an
arm that runs first and has the seed (or one seed for all), the reference and scaling
arms exist. `--quick` is a transformation of the study (first seed, quick bindings,
data names with a suffix), so the quick study is checked the same way.
"""
import dataclasses
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from omni_smola.studies.spec import Arm, Study, StudyConfigError

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of an arm: a seed and, for a per-task arm, a task."""
  arm: Arm
  seed: int
  task: Optional[str]
  directory: str  # relative to the study directory
  mixture: str  # what it trains on
  init_from: Optional["Run"] = None

  @property
  def label(self) -> str:
    return f"{self.arm.name}/seed_{self.seed}" + (f"/{self.task}" if self.task else "")


def quick(study: Study) -> Study:
  """The `--quick` study: its first seed, the quick bindings last, the suffixed data."""
  suffix = study.quick_name_suffix
  arms = []
  for arm in study.arms:
    arms.append(dataclasses.replace(
        arm, bindings={**arm.bindings, **study.quick_bindings},
        mixture=arm.mixture + suffix if arm.mixture else None,
        seeds=list(arm.seeds)[:1] if arm.seeds else None))
  return dataclasses.replace(study, arms=arms, seeds=list(study.seeds)[:1],
                             mixture=study.mixture + suffix)


def seeds_of(study: Study, arm: Arm) -> List[int]:
  return list(study.seeds if arm.seeds is None else arm.seeds)


def _check_arms(study: Study) -> Dict[str, Arm]:
  if not list(study.seeds):
    raise StudyConfigError(f"study {study.name!r}: Study.seeds is empty; give at least one")
  arms: Dict[str, Arm] = {}
  for arm in study.arms:
    if not isinstance(arm, Arm):
      raise StudyConfigError(f"study {study.name!r}: {arm!r} is not an Arm")
    if not RUN_NAME.match(arm.name or ""):
      raise StudyConfigError(f"arm {arm.name!r}: a name is a run directory: letters, digits, "
                             "'_', '-', '.'")
    if arm.name.lower() in {a.lower() for a in arms}:
      raise StudyConfigError(f"arm {arm.name!r}: two arms share this name, so they would "
                             "overwrite each other's run directories")
    if arm.seeds is not None and not list(arm.seeds):
      raise StudyConfigError(f"arm {arm.name!r}: its seed list is empty")
    seeds = seeds_of(study, arm)
    if len(set(seeds)) != len(seeds):
      raise StudyConfigError(f"arm {arm.name!r}: seeds {seeds} repeat a seed, so two runs "
                             "would share a run directory")
    if not list(arm.gin_files):
      raise StudyConfigError(f"arm {arm.name!r}: no gin_files")
    arms[arm.name] = arm
  for arm in arms.values():
    source = arms.get(arm.init_from) if arm.init_from else None
    if arm.init_from and source is None:
      raise StudyConfigError(f"arm {arm.name!r}: init_from names no arm: {arm.init_from!r}")
    if source is not None:
      if source.per_task:
        raise StudyConfigError(f"arm {arm.name!r}: init_from {source.name!r} is a per-task "
                               "arm; start from an arm with one checkpoint per seed")
      missing = set(seeds_of(study, arm)) - set(seeds_of(study, source))
      if missing and len(seeds_of(study, source)) != 1:
        raise StudyConfigError(f"arm {arm.name!r}: init_from {source.name!r} has no run with "
                               f"seed(s) {sorted(missing)} (and more than one seed to share)")
  if study.reference_arm is not None:
    reference = arms.get(study.reference_arm)
    if reference is None or not reference.per_task:
      raise StudyConfigError(f"Study.reference_arm {study.reference_arm!r} must name a "
                             "per-task arm (the specialists)")
  for name in study.scaling_arms:
    if name not in arms:
      raise StudyConfigError(f"Study.scaling_arms names no arm: {name!r}")
  for claim, pair in study.comparisons.items():
    if len(pair) != 2 or any(name not in arms for name in pair):
      raise StudyConfigError(f"Study.comparisons[{claim!r}] must be two arm names (A above "
                             f"B), got {pair!r}; the arms are {sorted(arms)}")
  return arms


def _in_dependency_order(arms: Dict[str, Arm]) -> List[Arm]:
  ordered, state = [], {}

  def visit(arm: Arm, chain: Tuple[str, ...]):
    if state.get(arm.name) == "done":
      return
    if arm.name in chain:
      raise StudyConfigError(f"arm {arm.name!r}: init_from makes a cycle: "
                             + " -> ".join(chain + (arm.name,)))
    if arm.init_from:
      visit(arms[arm.init_from], chain + (arm.name,))
    state[arm.name] = "done"
    ordered.append(arm)

  for arm in arms.values():
    visit(arm, ())
  return ordered


def plan(study: Study, tasks: Sequence[str]) -> List[Run]:
  """Every run of the study, each after the run it starts from.

  `tasks` are the leaf tasks of the study's mixture (the per-task arms' runs).
  """
  arms = _check_arms(study)
  runs: List[Run] = []
  by_arm_seed: Dict[Tuple[str, int], Run] = {}
  for arm in _in_dependency_order(arms):
    for seed in seeds_of(study, arm):
      source = None
      if arm.init_from:
        source_seeds = seeds_of(study, arms[arm.init_from])
        source = by_arm_seed[(arm.init_from, seed if seed in source_seeds else source_seeds[0])]
      for task in (tasks if arm.per_task else [None]):
        run = Run(arm=arm, seed=seed, task=task,
                  directory=os.path.join(arm.name, f"seed_{seed}", *([task] if task else [])),
                  mixture=task or arm.mixture or study.mixture, init_from=source)
        runs.append(run)
        if task is None:
          by_arm_seed[(arm.name, seed)] = run
  directories = [r.directory.lower() for r in runs]
  if len(set(directories)) != len(directories):
    raise StudyConfigError("two runs would share a run directory: "
                           + ", ".join(sorted({d for d in directories
                                               if directories.count(d) > 1})))
  return runs
