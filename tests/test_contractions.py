"""benchmarks/contractions.py, and through it the rule of docs/DESIGN.md (7. Performance
principles) that the adapters' products do exactly the analytic FLOPs (no FLOP on tokens a
group skips)."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapter_fixtures import (ALL_SPECS, BATCH, D_IN, D_OUT, LENGTH, NUM_VISUAL,
                              encoder_context, init, make_layer, tokens)
from omni_smola.nn.accounting import adapter_forward_flops, dense_forward_flops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
from contractions import dot_generals, product_flops, replay  # noqa: E402


@pytest.mark.parametrize("name", ["lora", "omni_sequence", "omni_token", "mole_token",
                                  "smola_sequence"])
def test_adapter_products_do_exactly_the_analytic_flops(name):
  spec, x = ALL_SPECS[name], tokens()
  context = encoder_context(lengths=(LENGTH, LENGTH))  # no padding: accounting counts valid tokens
  layer = make_layer(spec)
  variables = init(layer, x, context)
  products = dot_generals(lambda v, x: layer.apply(v, x, context), variables, x)
  per_group = {"mm": LENGTH, "vis": NUM_VISUAL, "txt": LENGTH - NUM_VISUAL}
  expected = BATCH * (dense_forward_flops(D_IN, D_OUT, LENGTH)
                      + adapter_forward_flops(spec, D_IN, D_OUT, per_group))
  assert product_flops(products) == expected


def test_replay_runs_the_same_products_on_fresh_operands():
  f = lambda a, b, c: jnp.einsum("btd,bsd->bts", a, b) @ c
  args = (jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4)), jnp.ones((5, 6)))
  products = dot_generals(f, *args)
  assert [(lhs, rhs) for lhs, rhs, _, _ in products] == [((2, 3, 4), (2, 5, 4)),
                                                         ((2, 3, 5), (5, 6))]
  assert product_flops(products) == 2 * 2 * 3 * 4 * 5 + 2 * 2 * 3 * 5 * 6
  run, operands = replay(products)
  outputs = run(operands)
  assert [o.shape for o in outputs] == [(2, 3, 5), (2, 3, 6)]
  lhs, rhs = operands[1]
  np.testing.assert_allclose(outputs[1], lhs @ rhs, rtol=1e-5)


def test_products_inside_a_loop_are_refused():
  def looped(x):
    return jax.lax.scan(lambda carry, _: (carry @ carry, None), x, None, length=3)[0]
  with pytest.raises(ValueError, match="scan"):
    dot_generals(looped, jnp.ones((4, 4)))
