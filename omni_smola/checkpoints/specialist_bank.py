"""A specialist bank from specialist runs: several tasks' LoRAs served in one model.

Each specialist run (`runs/specialist.gin`) saves the whole model: the frozen generalist
(backbone and its `adapter`) and its task's LoRA in the `specialist_adapter` slot. Serving
them together (`runs/serve_specialists.gin`) builds the model with a `task_lora` bank in
that slot (`nn/task_lora.py`) and fills it from the SPECIALISTS table, task -> checkpoint:

    SPECIALISTS = {'mini_shapes_count': 'runs/count', 'mini_photo_qa': 'runs/photo_qa'}

* The bank's rows are the tasks in sorted order (`specialist_tasks`, which gin also binds
  to the bank's `AdapterSpec.tasks`, so the two cannot disagree).
* Every checkpoint must hold the same generalist, bit for bit: every parameter outside
  the specialist slot. Specialists trained on different generalists do not add up to one
  model; the error names both checkpoints and the first parameter that differs.
* A checkpoint without a specialist LoRA (a generalist, a backbone) is an error naming the
  task and the checkpoint: it would serve the task with no specialist at all.
* Each specialist's `lora_a` [d, r] and `lora_b` [r, f] become row i of the bank's
  [n, d, r] and [n, r, f], per layer, so per-layer and scanned checkpoints and models mix.

* Each specialist's LoRA scale, alpha / r, is read from its run's record (the operative
  config the trainer writes beside the checkpoints, `checkpoints/run_config.py`), since the
  arrays do not hold alpha. A rank other than the bank's (`SPECIALIST_RANK`) is an error
  naming the task and both ranks; an alpha other than the bank's is applied: the row's
  `lora_b` is multiplied by (its scale) / (the bank's scale), so every row computes its own
  run's `(alpha / r) x A B`. A checkpoint with no record beside it is an error naming it,
  unless `load_bank.unrecorded_scale = 'bank'` says to serve it at the bank's scale.

Checkpoints are read one at a time and only their specialist parameters are kept besides
the first one's generalist, so memory holds two checkpoints, not n. Nothing is written.
"""
from typing import Any, Dict, Mapping, Tuple

from absl import logging
import gin
import numpy as np

from omni_smola import param_layout
from omni_smola.checkpoints import restore, run_config
from omni_smola.checkpoints.restore import CheckpointMismatchError
from omni_smola.checkpoints.tree import flatten
from omni_smola.nn.adapter_plan import AdapterPlan
from omni_smola.nn.adapter_spec import AdapterSpec
from omni_smola.training import checkpointing

SPECIALIST_SLOT = "specialist_adapter"
BANK_KIND = "task_lora"
SPECIALIST_KIND = "lora"  # what runs/specialist.gin trains in the slot
UNRECORDED_SCALES = ("refuse", "bank")


class SpecialistBankError(CheckpointMismatchError):
  """Specialist checkpoints that do not make one bank; names the task, checkpoint, path."""


@gin.configurable(module="omni_smola.checkpoints.specialist_bank")
def specialist_tasks(specialists: Mapping[str, str]) -> Tuple[str, ...]:
  """The bank's task names in row order: SPECIALISTS' tasks, sorted."""
  if not isinstance(specialists, Mapping) or not specialists:
    raise SpecialistBankError(
        f"SPECIALISTS must map task names to specialist checkpoints, got {specialists!r}")
  for task, path in specialists.items():
    if not isinstance(path, str) or not path:
      raise SpecialistBankError(f"SPECIALISTS[{task!r}] must be a checkpoint path, "
                                f"got {path!r}")
  return tuple(sorted(specialists))


def check_bank_plan(plan: AdapterPlan, specialists: Mapping[str, str]) -> None:
  """Raises unless `plan`'s specialist slot is a bank of exactly SPECIALISTS' tasks."""
  spec = getattr(plan, SPECIALIST_SLOT)
  if spec is None or spec.kind != BANK_KIND:
    raise SpecialistBankError(
        f"SPECIALISTS is set, but AdapterPlan.{SPECIALIST_SLOT} is "
        f"{spec.kind if spec else None!r}, not a {BANK_KIND!r} bank: include "
        "runs/serve_specialists.gin")
  tasks = specialist_tasks(specialists)
  if tuple(spec.tasks) != tasks:
    raise SpecialistBankError(
        f"AdapterSpec.tasks {tuple(spec.tasks)} of the {BANK_KIND} bank are not "
        f"SPECIALISTS' tasks in sorted order {tasks} (runs/serve_specialists.gin binds "
        "them with specialist_tasks)")


def _in_slot(name: str) -> bool:
  return SPECIALIST_SLOT in name.split("/")


def _read(task: str, path: str) -> Tuple[str, Dict[str, np.ndarray]]:
  """(the checkpoint read, its parameters per layer); errors name the task."""
  try:
    source = checkpointing.resolve_checkpoint(path)
    return source, param_layout.unstack_layers(restore.read_checkpoint(source))
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise SpecialistBankError(f"SPECIALISTS[{task!r}] = {path!r}: {e}") from None


def _first_difference(reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]
                      ) -> Tuple[str, str]:
  """(path, why) of the first parameter (in sorted order) that differs; ('', '') if none."""
  for name in sorted(set(reference) | set(other)):
    if name not in other:
      return name, "missing from the second"
    if name not in reference:
      return name, "missing from the first"
    a, b = np.asarray(reference[name]), np.asarray(other[name])
    if a.shape != b.shape or a.dtype != b.dtype:
      return name, f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    if a.tobytes() != b.tobytes():
      return name, "different values"
  return "", ""


def specialist_gain(task: str, source: str, bank: AdapterSpec,
                    unrecorded_scale: str = "refuse") -> float:
  """What row `task` of the bank multiplies its `lora_b` by: its own scale / the bank's.

  Its own scale is its run's recorded `alpha / r` (`run_config.recorded_spec`). Raises
  `SpecialistBankError`, naming the task, the checkpoint and both values, when the run
  trained another kind or rank than the bank's, or when nothing records it (unless
  `unrecorded_scale` is 'bank': then 1, the bank's own scale).
  """
  if unrecorded_scale not in UNRECORDED_SCALES:
    raise SpecialistBankError(f"load_bank.unrecorded_scale={unrecorded_scale!r}; known: "
                              f"{UNRECORDED_SCALES}")
  try:
    record, spec = run_config.recorded_spec(source, SPECIALIST_SLOT)
  except run_config.RunConfigError as e:
    raise SpecialistBankError(f"SPECIALISTS[{task!r}] ({source}): {e}") from None
  if record is None:
    if unrecorded_scale == "bank":
      logging.warning("SPECIALISTS[%r] (%s) has no run config (%s) recording its LoRA alpha; "
                      "served at the bank's scale %g (load_bank.unrecorded_scale = 'bank')",
                      task, source, run_config.RUN_CONFIG_FILE, bank.scale)
      return 1.0
    raise SpecialistBankError(
        f"SPECIALISTS[{task!r}]: no {run_config.RUN_CONFIG_FILE} beside checkpoint {source} "
        f"(nor in its two parent directories) records the LoRA alpha it was trained with, "
        f"and its arrays do not hold it; serving it at the bank's alpha/rank = {bank.scale:g} "
        "could apply the wrong scale. Point SPECIALISTS at the run's MODEL_DIR (the trainer "
        "writes config.gin there), or set omni_smola.checkpoints.specialist_bank.load_bank."
        "unrecorded_scale = 'bank' if SPECIALIST_RANK and SPECIALIST_ALPHA are its run's")
  if spec is None or spec.kind != SPECIALIST_KIND:
    raise SpecialistBankError(
        f"SPECIALISTS[{task!r}]: its run ({record}) trained AdapterPlan.{SPECIALIST_SLOT} = "
        f"{spec.kind if spec else None!r}, not a {SPECIALIST_KIND!r} specialist")
  if spec.rank != bank.rank:
    raise SpecialistBankError(
        f"SPECIALISTS[{task!r}] was trained at LoRA rank {spec.rank} ({record}), the bank "
        f"serves rank {bank.rank} (SPECIALIST_RANK): a bank holds one rank")
  if spec.scale != bank.scale:
    logging.info("SPECIALISTS[%r]: its run's LoRA scale alpha/r = %g (alpha %s, rank %d, %s) "
                 "differs from the bank's %g; its row is scaled to it", task, spec.scale,
                 spec.alpha, spec.rank, record, bank.scale)
  return spec.scale / bank.scale


def bank_arrays(specialists: Mapping[str, str], bank: AdapterSpec,
                unrecorded_scale: str = "refuse") -> Dict[str, np.ndarray]:
  """`{path: array}` of the serving model: the shared generalist and the stacked bank.

  `bank` is the serving model's `task_lora` spec: each row's `lora_b` is scaled so the
  row computes its own run's alpha / r (`specialist_gain`).
  """
  tasks = specialist_tasks(specialists)
  first = None  # (task, checkpoint, generalist arrays, specialist factor shapes)
  factors = {}  # path -> one array per task, in `tasks` order
  for task in tasks:
    source, flat = _read(task, specialists[task])
    own = {k: v for k, v in flat.items() if _in_slot(k)}
    if not own:
      raise SpecialistBankError(
          f"SPECIALISTS[{task!r}]: checkpoint {source} has no {SPECIALIST_SLOT} "
          "parameters: it is not a specialist run (runs/specialist.gin) but, e.g., a "
          "generalist or a backbone")
    gain = specialist_gain(task, source, bank, unrecorded_scale)  # before shapes: names ranks
    shared = {k: v for k, v in flat.items() if not _in_slot(k)}
    del flat
    if first is None:
      first = (task, source, shared, {k: (np.shape(v), np.asarray(v).dtype)
                                      for k, v in own.items()})
    else:
      first_task, first_source, generalist, first_factors = first
      both = (f"SPECIALISTS[{first_task!r}] ({first_source}) and SPECIALISTS[{task!r}] "
              f"({source})")
      name, why = _first_difference(generalist, shared)
      if name:
        raise SpecialistBankError(
            f"{both} were trained on different generalists: {name} ({why}); a bank serves "
            "specialists of one generalist")
      layout = {k: (np.shape(v), np.asarray(v).dtype) for k, v in own.items()}
      for name in sorted(set(first_factors) | set(layout)):
        if first_factors.get(name) != layout.get(name):
          raise SpecialistBankError(
              f"{both} have different specialist LoRAs at {name}: {first_factors.get(name)} "
              f"vs {layout.get(name)} (shape, dtype); a bank needs one AdapterSpec (rank, "
              "sites) for every specialist")
    for name, value in own.items():
      value = np.asarray(value)
      if gain != 1.0 and name.endswith("/lora_b"):  # (alpha_i / r) x A B = (bank scale) x A (g B)
        value = (value * gain).astype(value.dtype)
      factors.setdefault(name, []).append(value)
  stacked = {name: np.stack(rows) for name, rows in factors.items()}  # [n, ...] per factor
  return {**first[2], **stacked}


@gin.configurable(module="omni_smola.checkpoints.specialist_bank", denylist=[
    "specialists", "target", "plan"])
def load_bank(specialists: Mapping[str, str], target: Mapping[str, Any],
              plan: AdapterPlan, unrecorded_scale: str = "refuse") -> Any:
  """`target` (the serving model's params, abstract with shardings or concrete) filled.

  `plan` is the serving model's; its specialist slot must be a `task_lora` bank of
  SPECIALISTS' tasks (`check_bank_plan`). Every parameter of the model must come from the
  checkpoints: a bank row or generalist parameter they lack is an error, not a fresh
  initialisation. `unrecorded_scale`: 'refuse' (a specialist whose run config does not
  record its alpha is an error) or 'bank' (serve it at the bank's scale, with a warning).
  """
  check_bank_plan(plan, specialists)
  arrays = bank_arrays(specialists, getattr(plan, SPECIALIST_SLOT), unrecorded_scale)
  model_shapes = {name: tuple(np.shape(leaf))
                  for name, leaf in flatten(param_layout.unbox(target)).items()}
  try:
    arrays = param_layout.match_layer_layout(arrays, model_shapes)
  except param_layout.LayerLayoutError as e:
    raise SpecialistBankError(f"the specialists do not fit the model: {e}") from None
  missing = sorted(name for name in model_shapes
                   if param_layout.is_adapter_path(name) and name not in arrays)
  if missing:
    raise SpecialistBankError(
        f"the specialists' checkpoints ({', '.join(sorted(specialists.values()))}) have no "
        f"values for {len(missing)} adapter parameters of the model, e.g. {missing[:3]}: "
        "were they trained with another adapter config?")
  return restore.merge_into(target, arrays, source=f"the bank of SPECIALISTS {specialists}")
