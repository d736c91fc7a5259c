"""Adapters on a (data=2, model=4) and a (data=2, expert=2, model=2) mesh vs one device.

Prints one line per case; exits non-zero when outputs or gradients differ.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_smola import partitioning
from omni_smola.nn import AdaptedDense, AdapterPlan, AdapterSpec, TokenContext

assert jax.device_count() == 8, jax.devices()
BATCH, LENGTH, WIDTH, HEADS, HEAD_DIM, NUM_VISUAL = 4, 12, 16, 4, 4, 8


class Block(nn.Module):
  """An attention-shaped projection followed by an MLP-shaped one, both adapted."""
  spec: AdapterSpec

  @nn.compact
  def __call__(self, x, context):
    q = AdaptedDense((HEADS, HEAD_DIM), kernel_axes=("embed", "heads", "kv"),
                     adapters=AdapterPlan(adapter=self.spec), name="query")(x, context)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    y = AdaptedDense(WIDTH, axis=(-2, -1), kernel_axes=("heads", "kv", "embed"),
                     adapters=AdapterPlan(adapter=self.spec), name="out")(q, context)
    return AdaptedDense(32, kernel_axes=("embed", "mlp"),
                        adapters=AdapterPlan(adapter=self.spec),
                        name="wi")(y, context)


def perturbed(tree, key):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def check(spec, mesh_shape):
  model = Block(spec)
  x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, LENGTH, WIDTH))
  valid = jnp.arange(LENGTH)[None] < jnp.array([[12], [10], [11], [12]])
  context = TokenContext(valid=valid, num_visual_tokens=NUM_VISUAL,
                         instance_features=jnp.ones((BATCH, WIDTH)))
  # Jitted: eagerly, every initialiser and perturbation is its own small compilation.
  boxed = jax.jit(lambda key: model.init(key, x, context))(jax.random.PRNGKey(1))
  params = jax.jit(perturbed)(nn.unbox(boxed)["params"], jax.random.PRNGKey(2))

  def loss_and_outputs(params, x):
    y = model.apply({"params": params}, x, context)
    return jnp.sum(jnp.sin(y)), y

  grad_fn = jax.value_and_grad(loss_and_outputs, has_aux=True)
  (_, single_y), single_grads = jax.jit(grad_fn)(params, x)

  mesh = partitioning.create_mesh(*mesh_shape)
  rules = partitioning.rules_for_mesh(mesh, partitioning.logical_axis_rules())
  param_sharding = partitioning.variables_sharding(boxed, mesh, rules)["params"]
  batch_sharding = partitioning.logical_to_sharding(
      jax.sharding.PartitionSpec("batch", "length", "embed"), mesh, rules)
  sharded_params = jax.device_put(params, param_sharding)
  sharded_x = jax.device_put(x, batch_sharding)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    (_, mesh_y), mesh_grads = jax.jit(grad_fn)(sharded_params, sharded_x)
  expert_a = jax.tree_util.tree_leaves(
      {k: v for k, v in sharded_params["wi"]["adapter"].items()})[0]
  np.testing.assert_allclose(mesh_y, single_y, rtol=2e-5, atol=2e-5)
  for (path, g1), g8 in zip(jax.tree_util.tree_flatten_with_path(single_grads)[0],
                            jax.tree_util.tree_leaves(mesh_grads)):
    # Sharded reductions sum in another order: compare relative to the gradient's scale.
    # In numpy: an eager jnp op per leaf and sharding is a compilation each.
    g1, g8 = np.asarray(g1), np.asarray(g8)
    scale = float(np.max(np.abs(g1))) + 1e-6
    error = float(np.max(np.abs(g8 - g1)))
    assert error <= 1e-4 * scale, (jax.tree_util.keystr(path), error, scale)
  sharded = sum(len(leaf.sharding.device_set) > 1 and not leaf.sharding.is_fully_replicated
                for leaf in jax.tree_util.tree_leaves(sharded_params))
  assert sharded > 0, "no parameter was actually sharded"
  print(f"OK {spec.kind} {spec.routing} mesh={mesh_shape} sharded_params={sharded}")


for mesh_shape in [(2, 4, 1), (2, 2, 2)]:
  check(AdapterSpec(kind="omni_smola", rank=2, slots_per_expert=2,
                    experts_per_group={"mm": 2, "vis": 2, "txt": 2}), mesh_shape)
check(AdapterSpec(kind="omni_smola", rank=2, routing="token",
                  experts_per_group={"mm": 2, "vis": 2, "txt": 2}), (2, 4, 1))
for kind in ("lora", "mixlora", "mole"):
  check(AdapterSpec(kind=kind, rank=2, num_experts=4, num_factors=4), (2, 4, 1))
