"""The parameter tree's layout: where adapters sit in it, and how its leaves are boxed.

Every tool that reads parameter paths (freezing, accounting, checkpoint export and
restore, routing analysis) asks this module, so a new adapter slot or group is known
everywhere at once:

    text/encoder/layers_0/mlp/wi_0/kernel                   a backbone projection
    text/encoder/layers_0/mlp/wi_0/<slot>/...               an adapter in one of
                                                            `AdapterPlan`'s slots
    text/encoder/layers_0/mlp/wi_0/adapter/<group>/...      an Omni-SMoLA group
                                                            (mm, vis, txt)

A *component* names what a parameter belongs to in reports: `backbone`, a
Omni-SMoLA group, the adapter kind of a slot without groups (`lora`, `mixlora`...),
or the slot's short name for the slots after the first (`specialist`).

Layers come in two layouts (`models.layer_stack`): per layer, `encoder/layers_{i}/...` and
`Transformer/encoderblock_{i}/...`, or scanned, one `encoder/layers/...` /
`Transformer/encoderblock/...` whose arrays have a leading layer axis. `unstack_layers` and
`stack_layers` convert between them (checkpoints load into either layout; routing
statistics sown inside a scan come out per layer).

Fresh variables come boxed (`nn.meta.AxisMetadata`, carrying logical axis names);
`unbox` takes the values without applying a sharding constraint (unboxing with
`.unbox()` may add one, which needs a mesh).
"""
import collections
import dataclasses
import re
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import numpy as np

from omni_smola.nn.adapter_plan import SLOT_NAMES, AdapterPlan
from omni_smola.nn.adapter_spec import MODALITY_GROUPS

GROUPS = MODALITY_GROUPS
BACKBONE = "backbone"
Path = Union[str, Sequence[Any]]


@dataclasses.dataclass(frozen=True)
class AdapterPosition:
  """Where an adapter parameter (or a statistic it sowed) sits.

  Attributes:
    site: the adapted projection's parameter path (`text/encoder/layers_0/mlp/wi_0`).
    slot: the `AdapterPlan` slot (`adapter`, `specialist_adapter`).
    component: the Omni-SMoLA group, the slot's adapter kind, or (slots after the
      first) the slot's short name; see the module docstring.
  """
  site: str
  slot: str
  component: str


def path_keys(path: Path) -> tuple:
  """('text', 'encoder', ...) from a '/'-joined name, a tuple, or a jax key path."""
  if isinstance(path, str):
    return tuple(path.split("/"))
  keys = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        keys.append(str(getattr(key, attr)))
        break
    else:
      keys.append(str(key))
  return tuple(keys)


def path_name(path: Path) -> str:
  """'text/encoder/layers_0/mlp/wi_0/kernel' from any form `path_keys` takes."""
  return "/".join(path_keys(path))


# Modules a model adds beside its pretrained parts, handled as the adapter slots are (fresh
# at initialisation, optional in a backbone checkpoint, trained in 'adapters' mode): MoME's
# MoVE front end (`move/...`) and its MoLE beside each FFN (`.../layers_{i}/mome_mole/...`).
# Their component (and slot) in reports is the module's name.
ADDED_MODULES = ("move", "mome_mole")


def adapter_position(path: Path, plan: Optional[AdapterPlan] = None
                     ) -> Optional[AdapterPosition]:
  """The adapter `path` belongs to, or None for a backbone parameter.

  `plan` names the kind of an ungrouped adapter (`lora`); without it the component
  of such an adapter is its slot's name.
  """
  keys = path_keys(path)
  for index, name in enumerate(keys):
    if name in ADDED_MODULES:
      return AdapterPosition("/".join(keys[:index]), name, name)
    if name in SLOT_NAMES:
      following = keys[index + 1] if index + 1 < len(keys) else ""
      if name != SLOT_NAMES[0]:
        component = name[:-len("_adapter")] if name.endswith("_adapter") else name
      elif following in GROUPS:
        component = following
      else:
        spec = getattr(plan, name, None) if plan is not None else None
        component = spec.kind if spec is not None else name
      return AdapterPosition("/".join(keys[:index]), name, component)
  return None


def is_adapter_path(path: Path) -> bool:
  """Whether `path` lies inside an adapter slot or an added module (trains in 'adapters' mode)."""
  return any(name in SLOT_NAMES or name in ADDED_MODULES for name in path_keys(path))


def is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def unbox(tree):
  """The tree with every boxed leaf replaced by its value (no sharding constraint)."""
  return jax.tree_util.tree_map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


# ------------------------------------------------------------------ layer stacks

STACKS = ("layers", "encoderblock")  # scanned module -> per-layer modules `{name}_{i}`
_PER_LAYER = re.compile(rf"^({'|'.join(STACKS)})_(\d+)$")


class LayerLayoutError(ValueError):
  """Per-layer and scanned parameters that cannot be converted; names the stack."""


def _layer(value, index: int, axis: int):
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(value.shape[:axis] + value.shape[axis + 1:], value.dtype)
  return value[(slice(None),) * axis + (index,)]


def per_layer(key: Tuple[str, ...], value, axis: int = 0
              ) -> Iterator[Tuple[Tuple[str, ...], Any]]:
  """(key, value) as per-layer entries: a scanned `.../layers/...` splits along `axis`.

  `value` may be an array, a `ShapeDtypeStruct`, or a tuple of them (what `sow` keeps).
  Ours stack layers on axis 0; T5X's scanned checkpoints on its `param_scan_axis` (1).
  """
  for index, name in enumerate(key[:-1]):
    if name in STACKS:
      first = value[0] if isinstance(value, tuple) else value
      for layer in range(int(first.shape[axis])):
        renamed = key[:index] + (f"{name}_{layer}",) + key[index + 1:]
        if isinstance(value, tuple):
          yield renamed, tuple(_layer(v, layer, axis) for v in value)
        else:
          yield renamed, _layer(value, layer, axis)
      return
  yield key, value


def unstack_layers(flat: Mapping[str, Any], axis: int = 0) -> Dict[str, Any]:
  """'/'-named arrays with every scanned stack split (along `axis`) into `{stack}_{i}`."""
  out = {}
  for name, value in flat.items():
    for key, layer_value in per_layer(tuple(name.split("/")), value, axis):
      out["/".join(key)] = layer_value
  return out


def stack_layers(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """'/'-named arrays with every per-layer `{stack}_{i}` run stacked into `{stack}` (axis 0)."""
  groups = collections.defaultdict(dict)
  out = {}
  for name, value in flat.items():
    keys = name.split("/")
    for index, key in enumerate(keys[:-1]):
      match = _PER_LAYER.match(key)
      if match:
        stacked = "/".join(keys[:index] + [match.group(1)] + keys[index + 1:])
        groups[stacked][int(match.group(2))] = value
        break
    else:
      out[name] = value
  for stacked, layers in groups.items():
    if sorted(layers) != list(range(len(layers))):
      raise LayerLayoutError(f"{stacked}: layers {sorted(layers)} are not 0..{len(layers) - 1}")
    out[stacked] = np.stack([np.asarray(layers[i]) for i in range(len(layers))])
  return out


def is_stacked(name: str) -> bool:
  return any(key in STACKS for key in name.split("/")[:-1])


def match_layer_layout(loaded: Mapping[str, Any], target_shapes: Mapping[str, tuple]
                       ) -> Dict[str, Any]:
  """`loaded` in the layout of `target_shapes` (per layer or scanned, per stack).

  A scanned target whose depth differs from the checkpoint's number of layers is an error
  naming the stack and both depths (a shape mismatch would only name one array).
  """
  if set(loaded) <= set(target_shapes):
    return dict(loaded)  # already in the model's layout: no copies of the arrays
  per_layer_loaded = unstack_layers(loaded)
  target_stacked = {name for name in target_shapes if is_stacked(name)}
  if not target_stacked:
    return per_layer_loaded
  restacked = stack_layers({k: v for k, v in per_layer_loaded.items()
                            if is_stacked(stacked_name(k))})
  out = {k: v for k, v in per_layer_loaded.items() if not is_stacked(stacked_name(k))}
  for name, value in restacked.items():
    if name in target_stacked:
      depth, expected = np.shape(value)[0], target_shapes[name][0]
      if depth != expected:
        raise LayerLayoutError(
            f"{name}: the checkpoint has {depth} layers, the model {expected} "
            "(a checkpoint of a model of another depth)")
      out[name] = value
    else:  # this stack stays per layer in the model
      out.update(unstack_layers({name: value}))
  return out


def stacked_name(name: str) -> str:
  """The name `name` has in the scanned layout (itself when it is in no layer).

  For a parameter or a module below a layer: `text/encoder/layers_3/mlp/wi_0` ->
  `text/encoder/layers/mlp/wi_0`, what a scanned model's modules are called while traced.
  """
  keys = name.split("/")
  return "/".join(_PER_LAYER.sub(r"\1", key) if i < len(keys) - 1 else key
                  for i, key in enumerate(keys))
