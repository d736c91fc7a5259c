"""A study expanded into runs: one per (arm, seed[, task]), in dependency order.

Everything here is checked from the study's own fields, before gin parses any arm:
names and run directories are unique, seed lists are non-empty, `init_from` and each
`tower_checkpoints` entry name an arm that runs first and has the seed (or one seed for
all), the reference and scaling arms exist. `--quick` is a transformation of the study
(first seed, quick bindings, data names with a suffix), so the quick study is checked the
same way.
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
  # (tower, the run that trained it, its subtree or None: `vision_towers/<tower>`)
  tower_sources: Tuple[Tuple[str, "Run", Optional[str]], ...] = ()

  @property
  def label(self) -> str:
    return f"{self.arm.name}/seed_{self.seed}" + (f"/{self.task}" if self.task else "")

  @property
  def dependencies(self) -> List["Run"]:
    """The runs whose checkpoints this run reads: they must finish first."""
    return ([self.init_from] if self.init_from else []) + [r for _, r, _ in self.tower_sources]


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


def tower_entries(arm: Arm) -> List[Tuple[str, str, Optional[str]]]:
  """`Arm.tower_checkpoints` as (tower, source arm, subtree or None); a malformed entry is
  an error naming the arm and the tower."""
  entries = []
  for tower, value in arm.tower_checkpoints.items():
    source, subtree = None, None
    if isinstance(value, str):
      source = value
    elif isinstance(value, (tuple, list)) and len(value) == 2:
      source, subtree = value
    if not (isinstance(tower, str) and tower and isinstance(source, str) and source
            and (subtree is None or isinstance(subtree, str) and subtree)):
      raise StudyConfigError(
          f"arm {arm.name!r}: Arm.tower_checkpoints[{tower!r}] = {value!r}: give an arm "
          "name or (arm name, subtree or None)")
    entries.append((tower, source, subtree))
  return entries


def _sources(arm: Arm) -> List[Tuple[str, str]]:
  """(field, arm name) of every arm whose checkpoint `arm` reads."""
  return ([("init_from", arm.init_from)] if arm.init_from else []) + [
      (f"tower_checkpoints[{tower!r}]", source) for tower, source, _ in tower_entries(arm)]


def _check_source(study: Study, arms: Dict[str, Arm], arm: Arm, field: str, name: str):
  source = arms.get(name)
  if source is None:
    raise StudyConfigError(f"arm {arm.name!r}: {field} names no arm: {name!r}; the arms are "
                           f"{sorted(arms)}")
  if source.name == arm.name:
    raise StudyConfigError(f"arm {arm.name!r}: {field} names the arm itself")
  if source.per_task:
    raise StudyConfigError(f"arm {arm.name!r}: {field} {source.name!r} is a per-task "
                           "arm; start from an arm with one checkpoint per seed")
  missing = set(seeds_of(study, arm)) - set(seeds_of(study, source))
  if missing and len(seeds_of(study, source)) != 1:
    raise StudyConfigError(f"arm {arm.name!r}: {field} {source.name!r} has no run with "
                           f"seed(s) {sorted(missing)} (and more than one seed to share)")


def _source_run(by_arm_seed: Dict[Tuple[str, int], "Run"], study: Study, source: Arm,
                seed: int) -> "Run":
  """`source`'s run of `seed`, or of its only seed (a stage shared by every seed)."""
  seeds = seeds_of(study, source)
  return by_arm_seed[(source.name, seed if seed in seeds else seeds[0])]


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
    for field, name in _sources(arm):
      _check_source(study, arms, arm, field, name)
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
      raise StudyConfigError(f"arm {arm.name!r}: init_from / tower_checkpoints make a cycle: "
                             + " -> ".join(chain + (arm.name,)))
    for _, name in _sources(arm):
      visit(arms[name], chain + (arm.name,))
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
      source = (_source_run(by_arm_seed, study, arms[arm.init_from], seed)
                if arm.init_from else None)
      towers = tuple((tower, _source_run(by_arm_seed, study, arms[name], seed), subtree)
                     for tower, name, subtree in tower_entries(arm))
      for task in (tasks if arm.per_task else [None]):
        run = Run(arm=arm, seed=seed, task=task,
                  directory=os.path.join(arm.name, f"seed_{seed}", *([task] if task else [])),
                  mixture=task or arm.mixture or study.mixture, init_from=source,
                  tower_sources=towers)
        runs.append(run)
        if task is None:
          by_arm_seed[(arm.name, seed)] = run
  directories = [r.directory.lower() for r in runs]
  if len(set(directories)) != len(directories):
    raise StudyConfigError("two runs would share a run directory: "
                           + ", ".join(sorted({d for d in directories
                                               if directories.count(d) > 1})))
  return runs
