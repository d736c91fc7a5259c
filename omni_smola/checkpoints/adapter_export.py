"""Adapter slots in our own exported layout: `adapters/<slot>.safetensors` + `<slot>.json`.

SMoLA, Omni-SMoLA, MixLoRA and MoLE weigh their experts by the input, so neither a merged
kernel nor peft's LoRA format holds them. `export` writes each such slot (and, with
`--adapters`, every slot it does not merge) as two files:

* `<slot>.safetensors`: the slot's parameters, one tensor per parameter, named by its
  parameter path in our layout, always per layer (a scanned model's stacks are split with
  `param_layout.unstack_layers`), e.g.
  `text/encoder/layers_0/mlp/wi_0/adapter/mm/experts/expert_a` (a text-only model has no
  `text/` prefix). Shapes and dtypes are the model's own.
* `<slot>.json`: `{"format": "omni_smola.adapters", "format_version": 1, "slot": ...,
  "spec": dataclasses.asdict(AdapterSpec)}`: what builds the model that runs them.

`read_adapters(directory, slot)` returns `(flat params, AdapterSpec)`; the arrays merge
into a model built with that spec with `restore.load_pretrained` / `merge_into` as they are.
The math each family's parameters take part in is docs/DESIGN.md §3.2-3.5.
"""
import dataclasses
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
from safetensors.numpy import save_file

from omni_smola import param_layout
from omni_smola.checkpoints import hf_safetensors
from omni_smola.checkpoints.tree import Flat
from omni_smola.nn.adapter_plan import AdapterPlan
from omni_smola.nn.adapter_spec import AdapterConfigError, AdapterSpec

FORMAT = "omni_smola.adapters"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)


class AdapterFormatError(ValueError):
  """An adapters/ file that is missing or that this version cannot read; names the file."""


def _paths(directory: str, slot: str) -> Tuple[str, str]:
  return (os.path.join(directory, f"{slot}.safetensors"), os.path.join(directory, f"{slot}.json"))


def slot_params(flat: Mapping[str, Any], plan: AdapterPlan, slot: str) -> Flat:
  """The parameters of `slot` in `flat` (our layout), per layer, as numpy arrays."""
  per_layer = param_layout.unstack_layers(
      {n: v for n, v in flat.items() if param_layout.is_adapter_path(n)})
  out = {}
  for name, value in per_layer.items():
    position = param_layout.adapter_position(name, plan)
    if position is not None and position.slot == slot:
      out[name] = np.asarray(value)
  return out


def _write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  # Not hf_export.write_safetensors: its np.ascontiguousarray makes a 0-d array (a router's
  # `scale`) 1-d.
  save_file({name: np.ascontiguousarray(value).reshape(np.shape(value))
             for name, value in tensors.items()}, path, metadata={"format": FORMAT})
  mask = os.umask(0)
  os.umask(mask)
  os.chmod(path, 0o666 & ~mask)  # safetensors creates its files private (0600)


def write_adapters(directory: str, flat: Mapping[str, Any], plan: AdapterPlan,
                   slots: Optional[Iterable[str]] = None) -> List[str]:
  """Writes `<slot>.safetensors` and `<slot>.json` under `directory`; returns the slots.

  `slots` defaults to every slot of `plan` that adds a residual. A slot with no
  parameters in `flat` is a ValueError naming it (the export would silently lack it).
  """
  specs = dict(plan.items())
  if slots is None:
    slots = [slot for slot, spec in specs.items() if spec.adds_residual]
  written = []
  for slot in slots:
    spec = specs.get(slot)
    if spec is None or not spec.adds_residual:
      raise ValueError(f"slot {slot!r} holds no adapter in the model's plan ({plan})")
    tensors = slot_params(flat, plan, slot)
    if not tensors:
      raise ValueError(f"the parameters hold no {spec.kind} adapter of slot {slot!r}")
    os.makedirs(directory, exist_ok=True)
    weights, config = _paths(directory, slot)
    _write_safetensors(weights, tensors)
    with open(config, "w") as f:
      json.dump({"format": FORMAT, "format_version": FORMAT_VERSION, "slot": slot,
                 "spec": dataclasses.asdict(spec)}, f, indent=2, sort_keys=True)
    written.append(slot)
  return written


def available_slots(directory: str) -> List[str]:
  if not os.path.isdir(directory):
    return []
  return sorted(n[:-len(".json")] for n in os.listdir(directory) if n.endswith(".json"))


def read_spec(path: str) -> AdapterSpec:
  """The AdapterSpec in an adapters/<slot>.json; AdapterFormatError naming `path` if unread."""
  try:
    with open(path) as f:
      record = json.load(f)
  except json.JSONDecodeError as e:
    raise AdapterFormatError(f"{path} is not JSON: {e}") from None
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise AdapterFormatError(f"{path} is not an omni_smola adapter file (its \"format\" is "
                             f"{record.get('format') if isinstance(record, dict) else None!r}, "
                             f"expected {FORMAT!r})")
  version = record.get("format_version")
  if version not in SUPPORTED_VERSIONS:
    raise AdapterFormatError(f"{path} has format_version {version!r}; this omni_smola reads "
                             f"versions {list(SUPPORTED_VERSIONS)} (written by a newer one?)")
  fields = dict(record.get("spec") or {})
  if isinstance(fields.get("sites"), list):
    fields["sites"] = tuple(fields["sites"])
  try:
    return AdapterSpec(**fields)
  except (TypeError, AdapterConfigError) as e:
    raise AdapterFormatError(f"{path}: its spec does not make an AdapterSpec: {e}") from None


def read_adapters(directory: str, slot: str = "adapter") -> Tuple[Dict[str, np.ndarray],
                                                                  AdapterSpec]:
  """(`{parameter path: array}`, AdapterSpec) of `slot` as `write_adapters` wrote them."""
  weights, config = _paths(directory, slot)
  for path in (config, weights):
    if not os.path.isfile(path):
      present = available_slots(directory)
      raise AdapterFormatError(
          f"{path} does not exist: {directory} holds no adapter slot {slot!r} (it has "
          f"{', '.join(present) if present else 'none'})")
  spec = read_spec(config)
  arrays = {name: np.array(value) for name, value in
            hf_safetensors.read_safetensors(weights).items()}
  return arrays, spec
