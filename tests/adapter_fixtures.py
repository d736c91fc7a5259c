"""Shared helpers for adapter tests: tiny layers, contexts and perturbed params."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_smola.nn import AdaptedDense, AdapterPlan, AdapterSpec, TokenContext

D_IN, D_OUT, BATCH, LENGTH, NUM_VISUAL = 12, 10, 2, 9, 5


def make_layer(spec: AdapterSpec, features=D_OUT):
  return AdaptedDense(features=features, kernel_axes=("embed", "mlp"),
                      adapters=AdapterPlan(adapter=spec))


def tokens(seed=0, batch=BATCH, length=LENGTH, width=D_IN):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, length, width))


def encoder_context(static_layout=True, lengths=(LENGTH - 2, LENGTH)):
  """[visual; text] tokens, the first example padded at the end."""
  valid = jnp.arange(LENGTH)[None, :] < jnp.asarray(lengths)[:, None]
  visual = jnp.broadcast_to(jnp.arange(LENGTH)[None, :] < NUM_VISUAL, valid.shape)
  if static_layout:
    return TokenContext(valid=valid, visual=visual, num_visual_tokens=NUM_VISUAL)
  return TokenContext(valid=valid, visual=visual)


def init(layer, x, context, seed=1):
  return nn.unbox(layer.init(jax.random.PRNGKey(seed), x, context))


def perturb_adapter(variables, seed=2, scale=0.5, only=None):
  """Adds noise to adapter parameters (so B != 0); `only` filters paths by substring."""
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  treedef = jax.tree_util.tree_structure(variables)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
  leaves = []
  for key, (path, leaf) in zip(keys, flat):
    name = jax.tree_util.keystr(path)
    if "adapter" in name and (only is None or only in name):
      leaf = leaf + scale * jax.random.normal(key, leaf.shape, leaf.dtype)
    leaves.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, leaves)


ALL_SPECS = {
    "lora": AdapterSpec(kind="lora", rank=3),
    "smola_sequence": AdapterSpec(kind="smola", num_experts=3, slots_per_expert=2, rank=2),
    "smola_token": AdapterSpec(kind="smola", num_experts=3, rank=2, routing="token"),
    "omni_sequence": AdapterSpec(kind="omni_smola", rank=2, slots_per_expert=2,
                                 experts_per_group={"mm": 2, "vis": 3, "txt": 2}),
    "omni_token": AdapterSpec(kind="omni_smola", rank=2, routing="token",
                              experts_per_group={"mm": 2, "vis": 3, "txt": 2}),
    "mixlora": AdapterSpec(kind="mixlora", rank=2, num_factors=5),
    "mole_token": AdapterSpec(kind="mole", num_experts=4, top_k=2, rank=2),
    "mole_instance": AdapterSpec(kind="mole", num_experts=4, top_k=2, rank=2,
                                 mole_level="instance"),
}
