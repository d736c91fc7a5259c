"""MoVE (two towers, one padded) on a (data=2, model=4) mesh vs one device.

Prints one line; exits non-zero when outputs or gradients differ.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_smola import partitioning
from omni_smola.models.adt import ADTConfig
from omni_smola.models.move import MoVE, MoVEConfig

assert jax.device_count() == 8, jax.devices()
BATCH, WIDTH = 4, 8
CONFIG = MoVEConfig(tower_names=("clip", "pix2struct"), width=WIDTH,
                    adt=ADTConfig(num_queries=4, num_layers=1, num_heads=4, num_points=2))


def random_like(tree, seed):
  """numpy's generator: jax.random would compile one kernel per parameter shape."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape), jnp.float32), tree)


maps = random_like([jnp.zeros((BATCH, 4, 4, 16)), jnp.zeros((BATCH, 5, 6, 8))], seed=0)
padded = np.ones((BATCH, 5, 6), bool)
padded[1, 3:] = padded[2, :, 4:] = False
valid = [None, jnp.asarray(padded)]
instruction = random_like(jnp.zeros((BATCH, 12)), seed=1)
model = MoVE(CONFIG)
# Shapes only (an eager init would compile every op on its own): random values.
boxed = jax.eval_shape(model.init, jax.random.PRNGKey(1), maps, instruction, valid)
params = random_like(nn.unbox(boxed)["params"], seed=2)


def loss_and_outputs(params, maps):
  y, _ = model.apply({"params": params}, maps, instruction, valid)
  return jnp.sum(jnp.sin(y)), y


grad_fn = jax.value_and_grad(loss_and_outputs, argnums=(0, 1), has_aux=True)
(_, single_y), single_grads = jax.jit(grad_fn)(params, maps)

mesh = partitioning.create_mesh(2, 4)
rules = partitioning.rules_for_mesh(mesh, partitioning.logical_axis_rules())
sharded_params = jax.device_put(params, partitioning.variables_sharding(boxed, mesh, rules)
                                ["params"])
map_sharding = partitioning.logical_to_sharding(
    jax.sharding.PartitionSpec("batch", None, None, "embed"), mesh, rules)
sharded_maps = [jax.device_put(m, map_sharding) for m in maps]
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
  (_, mesh_y), mesh_grads = jax.jit(grad_fn)(sharded_params, sharded_maps)

np.testing.assert_allclose(np.asarray(mesh_y), np.asarray(single_y), rtol=2e-5, atol=2e-5)
for (path, g1), g8 in zip(jax.tree_util.tree_flatten_with_path(single_grads)[0],
                          jax.tree_util.tree_leaves(mesh_grads)):
  # Sharded reductions sum in another order: compare relative to the gradient's scale.
  # numpy: an eager jnp op per leaf would compile one kernel per shape and sharding.
  g1, g8 = np.asarray(g1), np.asarray(g8)
  scale = float(np.max(np.abs(g1))) + 1e-6
  error = float(np.max(np.abs(g8 - g1)))
  assert error <= 1e-4 * scale + 1e-6, (jax.tree_util.keystr(path), error, scale)
# The sampling locations are differentiated too (through the interpolation weights).
assert np.any(single_grads[0]["transform_pix2struct"]["layers_0"]["cross_attention"]
              ["offset_kernel"]), "no gradient reached the sampling offsets"
sharded = sum(not leaf.sharding.is_fully_replicated
              for leaf in jax.tree_util.tree_leaves(sharded_params))
assert sharded > 0, "no parameter was actually sharded"
print(f"OK move mesh=(2, 4) sharded_params={sharded}")
