"""Input fusion: one product against `[W | Phi | A_all]` computes what the separate ones do.

`omni_smola.nn.omni_smola.input_fusion` (gin) lets an (Omni-)SMoLA projection read its
input once; the outputs and every gradient (input, frozen kernel, adapter parameters)
must not change, for sequence and token routing, on the PaLI layout (two segments, a
padded example), where a token range has no block at all (`x W` alone there), and in
cached decoding of the model.
"""
import contextlib
import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapter_fixtures import D_OUT, encoder_context, make_layer, tokens
from model_fixtures import ADAPTER_SPECS, make_batch, perturb_adapters, random_params
from omni_smola.model import PaliModel
from omni_smola.models import configs
from omni_smola.nn import AdapterSpec

FUSION = "omni_smola.nn.omni_smola.input_fusion"


@contextlib.contextmanager
def input_fusion(enabled: bool):
  """Fusion on or off for both routings while tracing; gin is left cleared."""
  with gin.unlock_config():
    for routing in ("sequence_routing", "token_routing"):
      gin.bind_parameter(f"{FUSION}.{routing}", enabled)
  try:
    yield
  finally:
    gin.clear_config()


LAYER_CASES = {
    # [visual; text] by slices: segments {mm, vis} and {mm, txt}, one example padded.
    "omni_sequence_static": (AdapterSpec(kind="omni_smola", rank=2, slots_per_expert=2,
                                         experts_per_group={"mm": 2, "vis": 3, "txt": 2}),
                             True),
    # No block acts on the text tokens: there the output is `x W` alone.
    "omni_vis_only_token": (AdapterSpec(kind="omni_smola", rank=2, routing="token",
                                         experts_per_group={"mm": 0, "vis": 2, "txt": 0}),
                             True),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_fused_projection_has_the_unfused_outputs_and_gradients(case):
  spec, static_layout = LAYER_CASES[case]
  layer = make_layer(spec)
  x, context = tokens(), encoder_context(static_layout)
  variables = perturb_adapters(
      nn.unbox(jax.jit(layer.init)(jax.random.PRNGKey(1), x, context)))
  weights = jnp.arange(D_OUT, dtype=jnp.float32)

  def loss(variables, x):
    return jnp.sum(layer.apply(variables, x, context) * weights)

  products = {}
  for enabled in (True, False):
    with input_fusion(enabled):
      # A fresh function each time: jax caches a function's trace.
      traced = jax.make_jaxpr(lambda v, x: loss(v, x))(variables, x)
      products[enabled] = str(traced).count("dot_general")
  assert products[True] < products[False]  # the switch did fuse: fewer products

  def fused_and_unfused(variables, x):  # the switch is read while tracing
    results = []
    for enabled in (True, False):
      with input_fusion(enabled):
        results.append(jax.value_and_grad(loss, argnums=(0, 1))(variables, x))
    return results

  (fused_value, fused_grads), (value, grads) = jax.jit(fused_and_unfused)(variables, x)
  np.testing.assert_allclose(fused_value, value, rtol=1e-5)
  assert float(jnp.abs(grads[0]["params"]["kernel"]).max()) > 0  # a trainable kernel learns
  for fused_leaf, leaf in zip(jax.tree_util.tree_leaves(fused_grads),
                              jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(fused_leaf, leaf, rtol=1e-4, atol=1e-5)


def test_fused_projection_decodes_the_unfused_tokens_and_scores():
  # SMoLA (kind 'smola') everywhere: the encoder's projections fuse [W | Phi] (sequence
  # routing), the decoder's, causal, route per token and fuse [W | Phi | A_all] at every
  # cached step; the cross-attention's keys and values are computed once, fused, and cached.
  text = dataclasses.replace(configs.CONFIGS["tiny"].text, num_encoder_layers=1,
                             num_decoder_layers=1)
  model = PaliModel(configs.PaliConfig(text=text, vision=None), ADAPTER_SPECS["smola"])
  batch = make_batch(model, target_width=7)
  params = perturb_adapters(random_params(model, batch, seed=5))

  def fused_and_unfused(params, batch):  # the switch is read while tracing
    decoded = []
    for enabled in (True, False):
      with input_fusion(enabled):
        decoded.append(model.predict_batch_with_aux(params, batch))
    return decoded

  (fused_tokens, fused_aux), (unfused_tokens, unfused_aux) = jax.jit(fused_and_unfused)(
      params, batch)
  assert len(set(np.asarray(fused_tokens).ravel())) > 2  # a real decode, not a constant
  np.testing.assert_array_equal(fused_tokens, unfused_tokens)
  np.testing.assert_allclose(fused_aux["scores"], unfused_aux["scores"], rtol=1e-5,
                             atol=1e-5)
