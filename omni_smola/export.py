r"""Exports a checkpoint for Hugging Face: `python -m omni_smola.export --merge ...`.

    python -m omni_smola.export --gin_file=experiments/mini_export.gin \
      --gin_file=adapters/lora.gin --gin.CHECKPOINT_PATH=runs/demo/lora \
      --gin.EXPORT_DIR=runs/demo/lora_hf --merge

Restores CHECKPOINT_PATH into the gin-configured model (its adapters/*.gin, and
runs/specialist.gin's slot for a specialist) and writes EXPORT_DIR:

  text/                      T5ForConditionalGeneration (config.json, model.safetensors)
  vision/                    SiglipVisionModel (a PaLI model only)
  img_projection.safetensors PaLI's ViT -> text projection (`kernel` [vit, text], `bias`)
  merged/                    --merge: the merged parameters in our layout (Orbax; what
                             `eval` reads), with the adapters that could not be merged
  peft/<slot>/               --peft: each LoRA slot of the text model in peft's format
                             (adapter_model.safetensors, adapter_config.json)
  adapters/<slot>.{safetensors,json}
                             each slot left unmerged that depends on the input (SMoLA,
                             Omni-SMoLA, MixLoRA, MoLE; with --adapters, every slot not
                             merged), in our layout (`checkpoints/adapter_export.py`)
  export.json                what was merged, kept and exported

A checkpoint's arrays do not hold the adapters' `alpha` (the residual's scale is
alpha / r), and every mode writes it: into the merged kernels, peft's `lora_alpha`,
adapters/<slot>.json. So each adapter slot takes the alpha its run trained with, from
the run's record (MODEL_DIR/config.gin, `checkpoints/run_config.py`), as a specialist
bank does; gin's spec may leave alpha unset (None), and a gin alpha, rank or kind the
record contradicts is an error naming both values and the file (`recorded_plan`).
A checkpoint with no record is an error naming it, unless
`omni_smola.export.export.unrecorded_scale = 'gin'` says to trust gin's alpha.

`--merge` folds every LoRA slot into the kernels (`checkpoints/merge.py`); SMoLA,
Omni-SMoLA, MixLoRA and MoLE slots depend on the input and are kept (a log line names
each), so text/ and vision/ then hold the backbone with the LoRA merged and without
them; those slots are written to adapters/ too. `--peft` keeps the LoRA apart, for
`peft.PeftModel.from_pretrained`. `--adapters` writes the slots in our own layout
(adapters/), which needs no merge: the mode for a model without LoRA (an Omni-SMoLA
model); with `--merge` it changes nothing. A model with adapters needs one of the
three. EXPORT_DIR must be absent or empty unless
`--overwrite`; it is written in a temporary directory beside it and renamed into place
at the end, so a failed export leaves nothing half-written.
"""

import sys

if __name__ == "__main__":
  from omni_smola import console  # pylint: disable=g-import-not-at-top
  console.hold_native_stderr()
  # gin files `import omni_smola.export`, which must be this module.
  sys.modules.setdefault("omni_smola.export", sys.modules[__name__])

import json
import os
import dataclasses
from typing import Any, Dict, Mapping

from absl import flags
from absl import logging
import gin
import numpy as np

from omni_smola import launching
from omni_smola import param_layout
from omni_smola.checkpoints import (adapter_export, hf_export, peft_export, restore,
                                    run_config, staging)
from omni_smola.checkpoints.merge import MERGEABLE_KINDS, merge_lora
from omni_smola.checkpoints.tree import Flat, flatten, unflatten
from omni_smola.nn.adapter_plan import AdapterPlan

flags.DEFINE_bool("merge", False, "Fold every LoRA adapter into the frozen kernels.")
flags.DEFINE_bool("peft", False, "Write the text model's LoRA adapters in peft's format.")
flags.DEFINE_bool("adapters", False, "Write the adapter slots not merged in our own layout "
                  "(adapters/<slot>.safetensors, .json); done for every input-dependent slot "
                  "with --merge too.")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty EXPORT_DIR.")
FLAGS = flags.FLAGS

MERGED_SUBDIR = "merged"
ADAPTERS_SUBDIR = "adapters"
RECORD_NAME = "export.json"
UNRECORDED_SCALES = ("refuse", "gin")  # as specialist_bank.UNRECORDED_SCALES: refuse, or trust


def _residual_slots(plan: AdapterPlan) -> Dict[str, str]:
  return {slot: spec.kind for slot, spec in plan.items() if spec.adds_residual}


def _describe(slots: Mapping[str, str]) -> str:
  return ", ".join(f"{slot}: {kind}" for slot, kind in slots.items())


def check_modes(plan: AdapterPlan, merge: bool, peft: bool, adapters: bool = False) -> None:
  """Raises FlagError, naming the flags or slots, for a mode that cannot work."""
  slots = _residual_slots(plan)
  if adapters and not slots:
    raise launching.FlagError("--adapters: the model has no adapter to export")
  if merge and slots and not any(k in MERGEABLE_KINDS for k in slots.values()):
    raise launching.FlagError(f"--merge: the model has no LoRA to merge ({_describe(slots)}); "
                              "use --adapters to export its adapters in our layout")
  if merge and peft:
    raise launching.FlagError("--merge and --peft exclude each other: --merge folds the "
                              "LoRA into the kernels, --peft keeps it apart")
  if peft:
    if not slots:
      raise launching.FlagError("--peft: the model has no adapter to export")
    other = {s: k for s, k in slots.items() if k != "lora"}
    if other:
      raise launching.FlagError(f"--peft: peft's format holds LoRA only, and the model has "
                                f"{_describe(other)}; use --merge (it keeps them)")
  elif slots and not merge and not adapters:
    raise launching.FlagError(f"the model has adapters ({_describe(slots)}): pass --merge "
                              "to fold LoRA into the kernels, or --peft for peft's format, "
                              "or --adapters for our own layout (adapters/)")


def _check_slots_present(path: str, loaded: Flat, plan: AdapterPlan) -> None:
  for slot, kind in _residual_slots(plan).items():
    if not any(f"/{slot}/" in name for name in loaded):
      raise restore.CheckpointMismatchError(
          f"{path} has no parameters of adapter slot {slot!r} (the model's plan puts a "
          f"{kind} adapter there, AdapterPlan.{slot}); was it trained with another adapter "
          "config?")


def _recorded_slot(slot: str, spec, checkpoint_path: str):
  """`spec` (gin's, for `slot`) with the alpha its run recorded; see `recorded_plan`."""
  try:
    record, recorded = run_config.recorded_spec(checkpoint_path, slot)
  except run_config.RunConfigError as e:
    raise restore.CheckpointMismatchError(f"checkpoint {checkpoint_path}: {e}") from None
  if record is None:
    return None
  if recorded is None or not recorded.adds_residual:
    raise restore.CheckpointMismatchError(
        f"{record}: the run of checkpoint {checkpoint_path} had no adapter in slot {slot!r}, "
        f"where the model's plan puts a {spec.kind} adapter (AdapterPlan.{slot})")
  for field in ("kind", "rank"):
    if getattr(spec, field) != getattr(recorded, field):
      raise restore.CheckpointMismatchError(
          f"AdapterPlan.{slot}: gin's AdapterSpec.{field} = {getattr(spec, field)!r}, but "
          f"{record} records {field} = {getattr(recorded, field)!r} for the run of "
          f"checkpoint {checkpoint_path}")
  if spec.alpha is not None and spec.scale != recorded.scale:
    raise restore.CheckpointMismatchError(
        f"AdapterPlan.{slot}: gin's AdapterSpec.alpha = {spec.alpha!r} (alpha/r = "
        f"{spec.scale:g}), but {record} records alpha = {recorded.alpha!r} (alpha/r = "
        f"{recorded.scale:g}) for the run of checkpoint {checkpoint_path}; leave alpha unset "
        "(None) to take the record's, or set it to the record's")
  logging.info("AdapterPlan.%s: alpha %r (alpha/r = %g), as its run recorded in %s", slot,
               recorded.alpha, recorded.scale, record)
  return dataclasses.replace(spec, alpha=recorded.alpha)


def recorded_plan(plan: AdapterPlan, checkpoint_path: str,
                  unrecorded_scale: str = "refuse") -> AdapterPlan:
  """`plan` (gin's) with every adapter slot's alpha the one the checkpoint's run trained with.

  The run's record is its MODEL_DIR/config.gin (`run_config.recorded_spec`). A slot whose
  gin spec has another kind or rank than the record, or an alpha (not None) whose alpha/r
  differs from the record's, is a `CheckpointMismatchError` naming both values and the
  file. With no record: a `CheckpointMismatchError` naming the checkpoint, unless
  `unrecorded_scale` is 'gin' (then gin's specs, with a warning), as a specialist bank's
  `load_bank.unrecorded_scale`.
  """
  if unrecorded_scale not in UNRECORDED_SCALES:
    raise launching.GinConfigError(f"omni_smola.export.export.unrecorded_scale="
                                   f"{unrecorded_scale!r}; known: {UNRECORDED_SCALES}")
  slots = {slot: spec for slot, spec in plan.items() if spec.adds_residual}
  specs = {slot: _recorded_slot(slot, spec, checkpoint_path) for slot, spec in slots.items()}
  if all(spec is not None for spec in specs.values()):
    return dataclasses.replace(plan, **specs)
  if unrecorded_scale == "gin":
    logging.warning("no %s beside checkpoint %s records its adapters' alpha; exporting at "
                    "gin's (%s; omni_smola.export.export.unrecorded_scale = 'gin')",
                    run_config.RUN_CONFIG_FILE, checkpoint_path,
                    ", ".join(f"{slot}: alpha {spec.alpha!r}" for slot, spec in slots.items()))
    return plan
  raise restore.CheckpointMismatchError(
      f"no {run_config.RUN_CONFIG_FILE} beside checkpoint {checkpoint_path} (nor in its two "
      f"parent directories) records the alpha its adapters ({_describe(_residual_slots(plan))})"
      " were trained with, and its arrays do not hold it; exporting at gin's could apply the "
      "wrong scale. Point CHECKPOINT_PATH at the run's MODEL_DIR (the trainer writes "
      "config.gin there), or set omni_smola.export.export.unrecorded_scale = 'gin' if gin's "
      "AdapterSpec alpha is the run's")


def restore_flat(model, checkpoint_path: str) -> Flat:
  """The checkpoint's parameters as `{path: np.ndarray}`, checked against `model`."""
  # Imported here: the trainer's modules pull in TensorFlow, which the pure export
  # functions below do not need.
  # pylint: disable-next=g-import-not-at-top
  from omni_smola.training import checkpointing, partitioned_step
  path = checkpointing.resolve_checkpoint(checkpoint_path)
  loaded = restore.read_checkpoint(path)
  _check_slots_present(path, loaded, model.adapters)
  shapes = {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4)}
  abstract = partitioned_step.abstract_variables(model, shapes)
  try:
    params = restore.load_pretrained(param_layout.unbox(abstract["params"]), loaded)
  except restore.CheckpointMismatchError as e:
    raise restore.CheckpointMismatchError(str(e).replace("the given arrays", path, 1)) from None
  return {name: np.asarray(value) for name, value in flatten(params).items()}


def _text_params(flat: Flat, has_vision: bool) -> Flat:
  return hf_export.subtree(flat, "text") if has_vision else dict(flat)


def _check_text_only_lora(flat: Flat, plan: AdapterPlan, has_vision: bool) -> None:
  if not has_vision:
    return
  for name in flat:
    position = param_layout.adapter_position(name, plan)
    if position is not None and not name.startswith("text/"):
      raise launching.FlagError(f"--peft: {position.site} (slot {position.slot}) is outside "
                                "the text model, which is all peft's T5 adapters cover; use "
                                "--merge")


def _save_orbax(directory: str, flat: Flat) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, {"params": unflatten(flat)})
  checkpointer.wait_until_finished()


def export_params(flat: Mapping[str, Any], config, plan: AdapterPlan, output_dir: str, *,
                  merge: bool = False, peft: bool = False, adapters: bool = False,
                  overwrite: bool = False, source: str = "") -> Dict[str, Any]:
  """Writes `flat` (the model's parameters, our layout) to `output_dir`; returns the record.

  `config` is the model's `PaliConfig`; `plan` its `AdapterPlan`. See the module
  docstring for the files and the modes.
  """
  check_modes(plan, merge, peft, adapters)
  if getattr(config, "move", None) is not None:  # its towers, MoVE and MoLE have no HF file
    raise launching.FlagError("export: a MoME model (PaliConfig.move) is not supported: its "
                              "vision towers, MoVE and MoLE would be left out of every file")
  staging.check_output_dir(os.path.abspath(output_dir), overwrite)
  has_vision = config.vision is not None
  # Everything below is per layer (HF and peft name layers one by one); a scanned model's
  # stacks are split here, and merged/ loads back into either layout (restore converts).
  flat = param_layout.unstack_layers({name: np.asarray(value) for name, value in flat.items()})
  record: Dict[str, Any] = {"checkpoint": source, "merged": {}, "kept": {}, "peft": [],
                            "adapters": []}
  if merge:
    result = merge_lora(flat, plan)
    flat, plan = result.params, result.plan
    record.update(merged=result.merged, kept=result.kept)
  if peft:
    _check_text_only_lora(flat, plan, has_vision)
  backbone = {n: v for n, v in flat.items() if not param_layout.is_adapter_path(n)}
  with staging.staged_directory(output_dir, overwrite) as out:
    tensors, hf_config = hf_export.t5_to_hf(_text_params(backbone, has_vision), config.text)
    hf_export.write_hf_model(os.path.join(out, "text"), tensors, hf_config)
    if has_vision:
      tensors, hf_config = hf_export.siglip_vision_to_hf(hf_export.subtree(backbone, "img"),
                                                         config.vision)
      hf_export.write_hf_model(os.path.join(out, "vision"), tensors, hf_config)
      hf_export.write_safetensors(os.path.join(out, "img_projection.safetensors"),
                                  hf_export.subtree(backbone, "img_projection"))
    if peft:
      text = _text_params(flat, has_vision)
      for slot, spec in plan.items():
        tensors, adapter_config = peft_export.t5_lora_to_peft(text, slot, spec, config.text)
        peft_export.write_peft_adapter(os.path.join(out, "peft", slot), tensors,
                                       adapter_config)
        record["peft"].append(slot)
    # The slots no HF file holds (input-dependent ones), or with --adapters every slot left.
    unmerged = [slot for slot, spec in plan.items()
                if spec.adds_residual and (adapters or spec.kind not in MERGEABLE_KINDS)]
    if unmerged and (merge or adapters):
      record["adapters"] = adapter_export.write_adapters(
          os.path.join(out, ADAPTERS_SUBDIR), flat, plan, unmerged)
    if merge:
      _save_orbax(os.path.join(out, MERGED_SUBDIR), flat)
    with open(os.path.join(out, RECORD_NAME), "w") as f:
      json.dump(record, f, indent=2, sort_keys=True)
  if record["kept"]:
    logging.info("text/ and vision/ hold the backbone with the LoRA merged, without the kept "
                 "adapters (%s); %s/ and %s/ have them", _describe(record["kept"]),
                 MERGED_SUBDIR, ADAPTERS_SUBDIR)
  logging.info("Exported %s to %s", source or "the parameters", output_dir)
  return record


@gin.configurable(module="omni_smola.export")
def export(*, model, checkpoint_path: str, output_dir: str, merge: bool = False,
           peft: bool = False, adapters: bool = False, overwrite: bool = False,
           unrecorded_scale: str = "refuse") -> Dict[str, Any]:
  """Restores `checkpoint_path` into `model` and exports it (see the module docstring).

  Each adapter is exported at the alpha its run recorded (`recorded_plan`, which says
  what `unrecorded_scale` does).
  """
  if not output_dir:
    raise launching.FlagError("EXPORT_DIR is not set")
  # Bad flags, an occupied output and a contradicted record stop before the checkpoint is read.
  check_modes(model.adapters, merge, peft, adapters)
  staging.check_output_dir(os.path.abspath(output_dir), overwrite)
  plan = recorded_plan(model.adapters, checkpoint_path, unrecorded_scale)
  flat = restore_flat(model, checkpoint_path)  # alpha changes no shape: gin's model restores
  return export_params(flat, model.config, plan, output_dir, merge=merge,
                       peft=peft, adapters=adapters, overwrite=overwrite,
                       source=checkpoint_path)


def main(argv):
  # The log is not in EXPORT_DIR, which must stay empty until the export is renamed in.
  record = launching.run_configured(
      argv, "export", None,
      lambda: export(merge=FLAGS.merge, peft=FLAGS.peft, adapters=FLAGS.adapters,
                     overwrite=FLAGS.overwrite))
  print(json.dumps(record, sort_keys=True), flush=True)


def console_entry_point():
  launching.run(main)


if __name__ == "__main__":
  console_entry_point()
