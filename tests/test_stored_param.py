"""`stored_param`: flax's `param` at initialisation; on apply, the stored value, shape-checked
without re-running (re-tracing) the initialiser."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors

from omni_smola.nn.stored_param import stored_param

CALLS = []


def counted_init(rng, shape, dtype):
  CALLS.append(shape)
  return jax.random.normal(rng, shape, dtype)


class Both(nn.Module):
  """One parameter made each way, boxed with logical axes as the model's are."""

  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(counted_init, ("embed", "mlp"))
    ours = stored_param(self, "ours", init, (3, 4), jnp.float32)
    flax_own = self.param("flax_own", init, (3, 4), jnp.float32)
    return x @ ours + x @ flax_own


def test_it_initialises_as_flax_and_reads_the_stored_value_without_tracing_the_init():
  module, x = Both(), jnp.ones((2, 3))
  variables = module.init(jax.random.PRNGKey(0), x)
  params = variables["params"]
  assert isinstance(params["ours"], nn.Partitioned)  # boxed with its axes, as flax's
  assert params["ours"].names == params["flax_own"].names == ("embed", "mlp")
  assert len(CALLS) == 2
  CALLS.clear()
  out = module.apply(variables, x)
  assert len(CALLS) == 1  # flax's own re-traces its init to check the shape; ours does not
  unboxed = nn.unbox(params)
  np.testing.assert_allclose(out, x @ unboxed["ours"] + x @ unboxed["flax_own"], rtol=1e-6)


def test_a_stored_value_of_another_shape_fails_naming_the_parameter():
  module, x = Both(), jnp.ones((2, 3))
  params = nn.unbox(module.init(jax.random.PRNGKey(0), x)["params"])
  params["ours"] = jnp.ones((3, 5))
  with pytest.raises(errors.ScopeParamShapeError,
                     match=r"\"ours\".*shape \(3, 4\).*shape \(3, 5\)"):
    module.apply({"params": params}, x)
