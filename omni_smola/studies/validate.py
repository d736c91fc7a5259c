"""Everything a study needs, checked before its first step of training.

Each run's gin files and bindings are parsed as the train binary would (a missing file, a
typo'd macro or configurable, a required macro left unset), its training mixture must be
registered, and each arm's model is built abstractly by the accounting (an unknown adapter
kind or a bad adapter field fails there) which also gives the parameter and FLOP counts
of the results table (the abstract trace can be skipped: `account=False`, which still
builds the model's configuration). Each `Arm.tower_checkpoints` entry must name a tower of
the arm's model and of its source arm's. A finished run whose recorded configuration differs
from the study's is refused too: its scores would not be the arm's. Errors name the arm.
"""
import os
from typing import Any, Dict, List, Sequence

import gin

from omni_smola import params as params_lib
from omni_smola.analysis import collect, routing
from omni_smola.training import data_iterator
from omni_smola.studies import configure, markers
from omni_smola.studies.plan import Run, tower_entries
from omni_smola.studies.spec import Arm, Study, StudyConfigError


def study_tasks(study: Study) -> List[str]:
  """The leaf tasks of the study's mixture: the results' columns, the specialists' runs."""
  try:
    data_iterator.check_registered(study.mixture, study.task_modules)
  except data_iterator.UnknownTaskError as e:
    raise StudyConfigError(f"Study.mixture: {e}") from None
  return collect.leaf_tasks(study.mixture)


def check_tower_sources(arm: Arm, towers_of: Dict[str, List[str]]) -> None:
  """Each `arm.tower_checkpoints` entry names a tower of the arm's model and, read at its
  default subtree (`vision_towers/<tower>`), a tower of its source arm's model.

  `towers_of`: {arm name: its model's `PaliConfig.vision_towers` names}.
  """
  for tower, source, subtree in tower_entries(arm):
    if tower not in towers_of[arm.name]:
      raise StudyConfigError(
          f"arm {arm.name!r}: Arm.tower_checkpoints names tower {tower!r}, which its model "
          f"does not have (PaliConfig.vision_towers: {towers_of[arm.name]})")
    if subtree is None and tower not in towers_of[source]:
      raise StudyConfigError(
          f"arm {arm.name!r}: Arm.tower_checkpoints[{tower!r}] reads arm {source!r}, whose "
          f"model has no tower {tower!r} (its towers: {towers_of[source]}); give "
          "(arm, subtree) to read another subtree")


def check_tower_routing_arms(study: Study, tower_router_of: Dict[str, bool]) -> None:
  """Each `Study.tower_routing_arms` entry names an arm whose MoVE routes over towers.

  `tower_router_of`: {arm name: whether its model's MoVE has `fusion='router'`}."""
  for name in study.tower_routing_arms:
    if name not in tower_router_of:
      raise StudyConfigError(f"Study.tower_routing_arms names {name!r}, which is not an arm "
                             f"of the study (arms: {sorted(tower_router_of)})")
    if next(a for a in study.arms if a.name == name).per_task:
      raise StudyConfigError(
          f"Study.tower_routing_arms names arm {name!r}, which trains one run per task: "
          "its runs would share one analysis per seed")
    if not tower_router_of[name]:
      raise StudyConfigError(
          f"Study.tower_routing_arms names arm {name!r}, whose model has no tower router to "
          "analyse (it needs MoVE with MoVEConfig.fusion = 'router')")


def _build(gin_files: Sequence[str], bindings: Sequence[str], account: bool):
  """Builds the run's model object (its AdapterSpecs check their fields) and, with
  `account`, traces it abstractly for its parameter and FLOP counts (params.py).

  Returns (the accounting, {} without `account`; the model's vision tower names; whether
  MoVE routes over the towers).
  """
  gin.clear_config()
  params_lib.parse_config(gin_files, bindings)
  model, _, _ = params_lib.run_macros()
  config = getattr(model, "config", None)
  towers = [name for name, _ in getattr(config, "vision_towers", ())]
  tower_router = config is not None and routing.mome_tower_router(model) is not None
  if not account:
    return {}, towers, tower_router
  account = params_lib.account_from_gin()
  parameters, flops = account["parameters"], account["flops"]["total"]
  return {"adapters": {slot: spec["kind"] if spec else None
                       for slot, spec in account["model"]["adapters"].items()},
          "routed": routing.has_router(model),
          "parameters": {k: parameters[k] for k in ("total", "trainable", "adapters")},
          "flops": {"backbone": flops["backbone"], "adapters": flops["adapters"],
                    "total": flops["backbone"] + flops["adapters"]}}, towers, tower_router


def _checked(run: Run, check, *args):
  try:
    return check(*args)
  except Exception as e:  # pylint: disable=broad-except
    raise StudyConfigError(f"arm {run.arm.name!r} ({run.label}): {type(e).__name__}: "
                           f"{e}") from e
  finally:
    gin.clear_config()


def validate(study: Study, runs: Sequence[Run], study_dir: str,
             account: bool = True) -> Dict[str, Dict[str, Any]]:
  """Checks every run; returns {arm: its accounting} ({} per arm without `account`).

  Raises StudyConfigError naming the arm. An arm's runs differ only in the runner's
  bindings (seed, directory, mixture), so each arm is parsed and built once, cheap
  checks first for every arm, and each run's mixture is checked on its own.
  """
  configure.check_bindings(study)
  first = {}
  for run in runs:
    gin_files, bindings = configure.run_config(study, run, study_dir)
    _checked(run, data_iterator.check_registered, run.mixture, study.task_modules)
    if run.arm.name not in first:
      first[run.arm.name] = run
      _checked(run, configure.parse, gin_files, bindings)
    record = markers.done(os.path.join(study_dir, run.directory))
    if record is not None and record.get("config") != configure.recorded_config(gin_files,
                                                                                bindings):
      raise StudyConfigError(
          f"arm {run.arm.name!r}: {run.label} finished before with another configuration "
          f"(see {os.path.join(study_dir, run.directory, markers.DONE)}); use another "
          "--study_dir or delete that run")
  accounts, towers_of, tower_router_of = {}, {}, {}
  for name, run in first.items():
    accounts[name], towers_of[name], tower_router_of[name] = _checked(
        run, _build, *configure.run_config(study, run, study_dir), account)
  for arm in study.arms:
    check_tower_sources(arm, towers_of)
  check_tower_routing_arms(study, tower_router_of)
  return accounts
