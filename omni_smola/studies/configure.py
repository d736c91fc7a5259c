"""The gin configuration of one run of a study, as the train binary would parse it.

The runner owns the bindings that make runs distinct (MODEL_DIR, RANDOM_SEED, the
training mixture, INITIAL_CHECKPOINT_PATH, VISION_TOWER_CHECKPOINTS); an arm that binds one
of them would be silently overridden, so it is refused instead. The two checkpoint bindings
are the runner's only where it sets them: an arm that reads no other arm's checkpoint
(`init_from`, `tower_checkpoints`) may name released ones itself.
"""
import os
from typing import Dict, List, Sequence, Tuple

import gin

from omni_smola import launching
from omni_smola.studies.plan import Run
from omni_smola.studies.spec import Study, StudyConfigError, gin_binding

RUNNER_OWNED = ("MODEL_DIR", "RANDOM_SEED", "MIXTURE_OR_TASK_NAME", "MIXTURE_OR_TASK_MODULE",
                "INITIAL_CHECKPOINT_PATH", "VISION_TOWER_CHECKPOINTS")
# Runner-owned only for an arm with the field set: {binding: the Arm field that sets it}.
RUNNER_OWNED_WHEN_SET = {"INITIAL_CHECKPOINT_PATH": "init_from",
                         "VISION_TOWER_CHECKPOINTS": "tower_checkpoints"}
# Bindings holding the study directory: left out of a done record, so the directory can move.
PATH_BINDINGS = ("MODEL_DIR", "INITIAL_CHECKPOINT_PATH", "VISION_TOWER_CHECKPOINTS")


def check_bindings(study: Study) -> None:
  for arm in study.arms:
    # An arm that reads no other arm's checkpoint may name its own (a released one).
    owned = [n for n in RUNNER_OWNED if (n in arm.bindings or n in study.bindings)
             and not (n in RUNNER_OWNED_WHEN_SET and n not in study.bindings
                      and not getattr(arm, RUNNER_OWNED_WHEN_SET[n]))]
    if owned:
      raise StudyConfigError(
          f"arm {arm.name!r}: binds {', '.join(owned)}, which the study runner sets per run "
          "(use Arm.mixture, Arm.init_from, Arm.tower_checkpoints, Study.seeds, "
          "Study.task_modules)")


def run_config(study: Study, run: Run, study_dir: str) -> Tuple[List[str], List[str]]:
  """(gin files, gin bindings) of `run`: the study's bindings, the arm's, the runner's."""
  bindings: Dict[str, object] = {**study.bindings, **run.arm.bindings}
  bindings.update(MODEL_DIR=os.path.join(study_dir, run.directory), RANDOM_SEED=run.seed,
                  MIXTURE_OR_TASK_NAME=run.mixture, MIXTURE_OR_TASK_MODULE=study.task_modules)
  if run.init_from is not None:
    bindings["INITIAL_CHECKPOINT_PATH"] = os.path.join(study_dir, run.init_from.directory)
  if run.tower_sources:
    bindings["VISION_TOWER_CHECKPOINTS"] = {
        tower: (os.path.join(study_dir, source.directory) if subtree is None
                else (os.path.join(study_dir, source.directory), subtree))
        for tower, source, subtree in run.tower_sources}
  return list(run.arm.gin_files), [gin_binding(k, v) for k, v in bindings.items()]


def parse(gin_files: Sequence[str], bindings: Sequence[str],
          search_paths: Sequence[str] = (launching.REPO_GIN_CONFIGS,)) -> None:
  """Clears gin and parses a run's files and bindings (errors name the file or binding)."""
  gin.clear_config()
  launching.parse_gin(list(gin_files), list(bindings), list(search_paths))


def recorded_config(gin_files: Sequence[str], bindings: Sequence[str]) -> Dict[str, list]:
  """What a done record keeps to recognise its configuration (paths left out, so a study
  directory can move)."""
  return {"gin_files": list(gin_files),
          "bindings": [b for b in bindings
                       if not b.startswith(tuple(f"{n} =" for n in PATH_BINDINGS))]}
