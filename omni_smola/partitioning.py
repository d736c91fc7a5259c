"""Logical axis rules and meshes: one table decides how everything is sharded.

Every parameter and the main activations name their axes logically (`embed`,
`mlp`, `heads`, ...); the rules below map those names onto mesh axes. The
defaults are t5x's 1-D model-parallel rules plus our adapter axes. A mesh may
also have an `expert` axis, which then shards the adapters' expert stacks.
"""
from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = Tuple[Tuple[str, Optional[object]], ...]

DEFAULT_RULES: LogicalRules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("joined_kv", "model"),
    ("length", None),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
    ("layers", None),
    ("stack", None),
    ("patch", None),
    ("channels", None),
    ("position", None),
    # Ours. Expert stacks shard over an `expert` mesh axis when the mesh has one.
    ("expert", "expert"),
    ("lora_rank", None),
    ("slots", None),
    # A task_lora bank: replicated, so each example's gather stays on its device.
    ("specialists", None),
)


@gin.configurable
def logical_axis_rules(extra_rules: Sequence[Tuple[str, Optional[object]]] = (),
                       ) -> LogicalRules:
  """The rule table; `extra_rules` come first, so they override the defaults."""
  return tuple(extra_rules) + DEFAULT_RULES


def rules_for_mesh(mesh: Mesh, rules: LogicalRules) -> LogicalRules:
  """Drops mesh axes the mesh does not have (an `expert` rule on a 2-D mesh)."""
  def keep(target):
    if target is None:
      return None
    if isinstance(target, (tuple, list)):
      kept = tuple(t for t in target if t in mesh.axis_names)
      return kept or None
    return target if target in mesh.axis_names else None
  return tuple((name, keep(target)) for name, target in rules)


@gin.configurable
def create_mesh(data: int = -1, model: int = 1, expert: int = 1,
                devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, model[, expert]) mesh; -1 for `data` takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  try:
    data, model, expert = mesh_axis_sizes(len(devices), data, model, expert)
  except ValueError as e:
    raise ValueError(f"create_mesh: {e}") from None
  shape, names = (data, model), ("data", "model")
  if expert > 1:
    shape, names = (data, expert, model), ("data", "expert", "model")
  return Mesh(np.asarray(devices).reshape(shape), names)


MESH_AXES = ("data", "model", "expert")


def mesh_axis_sizes(num_devices: int, data: int = -1, model: int = 1,
                    expert: int = 1) -> Tuple[int, int, int]:
  """(data, model, expert) over `num_devices`; -1 for `data` takes the remaining devices."""
  for name, size in (("model", model), ("expert", expert)):
    if size < 1:
      raise ValueError(f"mesh axis {name} must be >= 1, got {size}")
  if data == -1:
    if num_devices % (model * expert):
      raise ValueError(f"{num_devices} devices are not divisible by "
                       f"model={model} x expert={expert}")
    data = num_devices // (model * expert)
  if data < 1 or data * model * expert != num_devices:
    raise ValueError(f"data={data} x model={model} x expert={expert} != "
                     f"{num_devices} devices")
  return data, model, expert


def parse_mesh_spec(spec: str) -> Dict[str, int]:
  """'data:4,model:4[,expert:2]' -> `create_mesh`'s sizes (data -1 when not given).

  Errors name the spec and the item at fault; whether the sizes fit a device count is
  `mesh_axis_sizes`'s check.
  """
  sizes: Dict[str, int] = {}
  for item in spec.split(","):
    name, sep, size = item.strip().partition(":")
    if not sep or name not in MESH_AXES:
      raise ValueError(f"mesh {spec!r}: {item.strip()!r} is not AXIS:SIZE with AXIS one of "
                       f"{', '.join(MESH_AXES)}")
    if name in sizes:
      raise ValueError(f"mesh {spec!r}: axis {name!r} is given twice")
    try:
      sizes[name] = int(size)
    except ValueError:
      raise ValueError(f"mesh {spec!r}: size {size!r} of axis {name!r} is not an "
                       "integer") from None
  return {"data": sizes.get("data", -1), "model": sizes.get("model", 1),
          "expert": sizes.get("expert", 1)}


def logical_to_sharding(logical_tree, mesh: Mesh, rules: LogicalRules):
  """PartitionSpecs of logical names (e.g. from `nn.get_partition_spec`) -> shardings."""
  rules = rules_for_mesh(mesh, rules)
  mesh_specs = nn.logical_to_mesh(logical_tree, rules)
  return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), mesh_specs,
                                is_leaf=lambda x: isinstance(x, PartitionSpec))


def variables_sharding(abstract_variables, mesh: Mesh, rules: LogicalRules):
  """NamedShardings for a (boxed) variable tree from `jax.eval_shape(model.init, ...)`.

  Raises `MeshDoesNotFitError` when the mesh cannot hold a variable (see
  `check_mesh_fits`), before anything is initialised, restored or written.
  """
  logical = nn.get_partition_spec(abstract_variables)
  shardings = logical_to_sharding(logical, mesh, rules)
  check_mesh_fits(nn.meta.unbox(abstract_variables), logical, shardings)
  return shardings


class MeshDoesNotFitError(ValueError):
  """A mesh splits some variable's dimension into parts of unequal size."""


def check_mesh_fits(abstract_tree, logical_tree, sharding_tree) -> None:
  """Every sharded dimension must divide evenly over its mesh axes.

  JAX refuses uneven shardings, naming a shape but not the variable. A
  checkpoint restored onto another mesh (DESIGN.md, "Elastic restore") meets
  this first: (data=1, model=8) cannot hold 4 attention heads. The error names
  each variable, its logical axis, the mesh axes and the settings to change.
  """
  problems = []

  def check(path, leaf, logical, sharding):
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
      axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
      parts = int(np.prod([sharding.mesh.shape[a] for a in axes], dtype=np.int64))
      if size % parts:
        split = " x ".join(f"{a}={sharding.mesh.shape[a]}" for a in axes)
        problems.append(f"{jax.tree_util.keystr(path, simple=True, separator='/')} "
                        f"{tuple(leaf.shape)}: dimension {dim} ({logical[dim]!r}, size "
                        f"{size}) over {split}")

  jax.tree_util.tree_map_with_path(
      check, abstract_tree, logical_tree, sharding_tree,
      is_leaf=lambda x: isinstance(x, PartitionSpec))
  if problems:
    mesh = next(s.mesh for s in jax.tree_util.tree_leaves(sharding_tree))
    shape = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
    raise MeshDoesNotFitError(
        f"the mesh ({shape}) does not fit {len(problems)} variables: a dimension the "
        "logical axis rules shard is not divisible by its mesh axes' size. Choose mesh "
        "sizes that divide it (create_mesh.model / .expert) or map the logical axis "
        "elsewhere (logical_axis_rules.extra_rules):\n  " + "\n  ".join(problems))
