"""Logical axis rules and meshes: one table decides how everything is sharded.

Every parameter and the main activations name their axes logically (`embed`,
`mlp`, `heads`, ...); the rules below map those names onto mesh axes. The
defaults are t5x's 1-D model-parallel rules plus our adapter axes. A mesh may
also have an `expert` axis, which then shards the adapters' expert stacks.
"""
from typing import Optional, Sequence, Tuple

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
  for name, size in (("model", model), ("expert", expert)):
    if size < 1:
      raise ValueError(f"create_mesh.{name} must be >= 1, got {size}")
  if data == -1:
    if len(devices) % (model * expert):
      raise ValueError(
          f"create_mesh: {len(devices)} devices are not divisible by "
          f"model={model} x expert={expert}")
    data = len(devices) // (model * expert)
  if data * model * expert != len(devices):
    raise ValueError(
        f"create_mesh: data={data} x model={model} x expert={expert} != "
        f"{len(devices)} devices")
  shape, names = (data, model), ("data", "model")
  if expert > 1:
    shape, names = (data, expert, model), ("data", "expert", "model")
  return Mesh(np.asarray(devices).reshape(shape), names)


def logical_to_sharding(logical_tree, mesh: Mesh, rules: LogicalRules):
  """PartitionSpecs of logical names (e.g. from `nn.get_partition_spec`) -> shardings."""
  rules = rules_for_mesh(mesh, rules)
  mesh_specs = nn.logical_to_mesh(logical_tree, rules)
  return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), mesh_specs,
                                is_leaf=lambda x: isinstance(x, PartitionSpec))


def variables_sharding(abstract_variables, mesh: Mesh, rules: LogicalRules):
  """NamedShardings for a (boxed) variable tree from `jax.eval_shape(model.init, ...)`."""
  return logical_to_sharding(nn.get_partition_spec(abstract_variables), mesh, rules)
