"""`nn.products.product`: einsum forward, einsum-form gradients equal to JAX's own."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapter_fixtures import ALL_SPECS, encoder_context, init, make_layer, perturb_adapter, tokens
from omni_smola.nn import lora, low_rank_experts, omni_smola, products

SPECS = {
    "btd,dk->btk": ((2, 5, 6), (6, 3)),      # tokens x weight (LoRA, token routing)
    "bts,btd->bsd": ((2, 5, 4), (2, 5, 6)),  # dispatch: slots from tokens
    "bts,bsf->btf": ((2, 5, 4), (2, 4, 7)),  # combine: tokens from slots
    "...k,kf->...f": ((3, 2, 4), (4, 5)),    # leading axes summed in the weight gradient
}


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_product_matches_einsum_and_its_gradients(spec):
  lhs_shape, rhs_shape = SPECS[spec]
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  lhs, rhs = jax.random.normal(keys[0], lhs_shape), jax.random.normal(keys[1], rhs_shape)
  out, pullback = jax.vjp(lambda a, b: products.product(spec, a, b), lhs, rhs)
  expected, expected_pullback = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), lhs, rhs)
  cotangent = jax.random.normal(keys[2], out.shape)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  for got, want in zip(pullback(cotangent), expected_pullback(cotangent)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_come_back_in_each_operands_dtype():
  lhs = jnp.ones((2, 3, 4), jnp.bfloat16)
  rhs = jnp.ones((4, 5), jnp.float32)
  lhs_grad, rhs_grad = jax.grad(
      lambda a, b: products.product("btd,dk->btk", a, b).astype(jnp.float32).sum(),
      argnums=(0, 1))(lhs, rhs)
  assert lhs_grad.dtype == jnp.bfloat16 and rhs_grad.dtype == jnp.float32


@pytest.mark.parametrize("name", ["lora", "omni_sequence", "omni_token", "mole_token"])
def test_adapter_gradients_equal_those_of_plain_einsums(name, monkeypatch):
  """The custom backward changes how the products are laid out, not what they are."""
  layer, x, context = make_layer(ALL_SPECS[name]), tokens(), encoder_context()
  variables = perturb_adapter(init(layer, x, context))

  def gradients():
    def loss(adapter, x):
      params = dict(variables["params"], adapter=adapter)
      return jnp.sum(jnp.sin(layer.apply({"params": params}, x, context)))
    return jax.grad(loss, argnums=(0, 1))(variables["params"]["adapter"], x)

  custom = gradients()
  for module in (lora, low_rank_experts, omni_smola):  # each imported `product` by name
    monkeypatch.setattr(module, "product", lambda spec, a, b: jnp.einsum(spec, a, b))
  plain = gradients()
  for got, want in zip(jax.tree_util.tree_leaves(custom), jax.tree_util.tree_leaves(plain)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
