"""The adapters' definition (docs/DESIGN.md, "3. The math"), pinned on tiny layers."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapter_fixtures import (ALL_SPECS, BATCH, D_IN, D_OUT, LENGTH, encoder_context,
                              init, make_layer, perturb_adapter, tokens)
from omni_smola.nn import AdapterSpec, TokenContext
from omni_smola.nn.smola import masked_softmax_over_tokens
from omni_smola.nn.soft_router import SoftRouter


@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_untrained_adapter_leaves_frozen_output_exactly_unchanged(name):
  x, context = tokens(), encoder_context()
  variables = init(make_layer(ALL_SPECS[name]), x, context)
  adapted = make_layer(ALL_SPECS[name]).apply(variables, x, context)
  frozen = x @ variables["params"]["kernel"]
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(frozen))


def test_one_expert_token_routed_smola_equals_lora_with_same_factors():
  x, context = tokens(), TokenContext()
  smola = make_layer(AdapterSpec(kind="smola", num_experts=1, rank=3, routing="token"))
  lora = make_layer(AdapterSpec(kind="lora", rank=3))
  smola_vars = perturb_adapter(init(smola, x, context))
  lora_vars = init(lora, x, context)
  experts = smola_vars["params"]["adapter"]["mm"]["experts"]  # `smola` is Omni-SMoLA's mm block
  lora_vars["params"]["kernel"] = smola_vars["params"]["kernel"]
  lora_vars["params"]["adapter"] = {"lora_a": experts["expert_a"][0],
                                    "lora_b": experts["expert_b"][0]}
  np.testing.assert_allclose(smola.apply(smola_vars, x, context),
                             lora.apply(lora_vars, x, context), rtol=1e-5, atol=1e-5)


def test_lora_scales_by_alpha_over_rank():
  x, context = tokens(), TokenContext()
  base = make_layer(AdapterSpec(kind="lora", rank=2))
  scaled = make_layer(AdapterSpec(kind="lora", rank=2, alpha=6.0))
  variables = perturb_adapter(init(base, x, context))
  frozen = x @ variables["params"]["kernel"]
  residual = base.apply(variables, x, context) - frozen
  np.testing.assert_allclose(scaled.apply(variables, x, context) - frozen, 3.0 * residual,
                             rtol=1e-5, atol=1e-5)


def _router_logits(seed=0):
  x = tokens(seed)
  router = SoftRouter(num_experts=3, slots_per_expert=2, in_features=x.shape[-1])
  return router.apply(router.init(jax.random.PRNGKey(seed), x), x)


def test_dispatch_weights_sum_to_one_over_each_groups_valid_tokens():
  context = encoder_context()
  valid = context.valid_mask(BATCH, LENGTH)
  text_group = valid & ~context.visual_mask(BATCH, LENGTH)
  dispatch = masked_softmax_over_tokens(_router_logits(), text_group)
  np.testing.assert_allclose(jnp.sum(dispatch, axis=1), np.ones((BATCH, 3, 2)), rtol=1e-6)


def test_padded_tokens_and_tokens_outside_the_group_receive_no_dispatch_weight():
  context = encoder_context()
  valid = context.valid_mask(BATCH, LENGTH)
  visual_group = valid & context.visual_mask(BATCH, LENGTH)
  dispatch = masked_softmax_over_tokens(_router_logits(), visual_group)
  outside = ~np.asarray(visual_group)
  assert outside.any() and (~np.asarray(valid)).any()
  assert np.all(np.asarray(dispatch)[outside] == 0.0)


def test_group_without_tokens_gets_zero_dispatch_not_nan():
  empty = jnp.zeros((BATCH, LENGTH), bool)
  dispatch = masked_softmax_over_tokens(_router_logits(), empty)
  assert np.all(np.asarray(dispatch) == 0.0)


@pytest.mark.parametrize("name", ["smola_sequence", "omni_sequence", "mixlora",
                                  "mole_instance"])
def test_changing_a_padded_tokens_values_changes_no_valid_output(name):
  x, context = tokens(), encoder_context()
  layer = make_layer(ALL_SPECS[name])
  variables = perturb_adapter(init(layer, x, context))
  padded_position = LENGTH - 1  # example 0 is padded from LENGTH - 2 on
  assert not bool(context.valid[0, padded_position])
  changed = x.at[0, padded_position].add(10.0)
  before = layer.apply(variables, x, context)
  after = layer.apply(variables, changed, context)
  valid = np.asarray(context.valid)
  np.testing.assert_allclose(np.asarray(after)[valid], np.asarray(before)[valid],
                             rtol=1e-5, atol=1e-5)


def test_sequence_routing_mixes_tokens_of_one_example_only():
  x, context = tokens(), encoder_context()
  layer = make_layer(ALL_SPECS["omni_sequence"])
  variables = perturb_adapter(init(layer, x, context))
  before = layer.apply(variables, x, context)
  after = layer.apply(variables, x.at[1, 0].add(5.0), context)
  np.testing.assert_array_equal(np.asarray(after[0]), np.asarray(before[0]))
  assert not np.allclose(after[1, 2], before[1, 2])  # a token of the changed example moved


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_static_layout_slices_equal_modality_masks(routing):
  x = tokens()
  spec = AdapterSpec(kind="omni_smola", rank=2, routing=routing, slots_per_expert=2,
                     experts_per_group={"mm": 2, "vis": 3, "txt": 2})
  layer = make_layer(spec)
  sliced, masked = encoder_context(static_layout=True), encoder_context(static_layout=False)
  variables = perturb_adapter(init(layer, x, sliced))
  np.testing.assert_allclose(layer.apply(variables, x, sliced),
                             layer.apply(variables, x, masked), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group,other", [("vis", "txt"), ("txt", "vis")])
@pytest.mark.parametrize("static_layout", [True, False])
def test_a_modality_groups_parameters_touch_only_its_own_tokens(group, other, static_layout):
  x, context = tokens(), encoder_context(static_layout=static_layout)
  layer = make_layer(ALL_SPECS["omni_sequence"])
  variables = perturb_adapter(init(layer, x, context))
  moved = perturb_adapter(variables, seed=7, only=f"'{group}'")
  before, after = layer.apply(variables, x, context), layer.apply(moved, x, context)
  visual = np.asarray(context.visual_mask(BATCH, LENGTH))
  valid = np.asarray(context.valid_mask(BATCH, LENGTH))
  own = (visual if group == "vis" else ~visual) & valid
  np.testing.assert_array_equal(np.asarray(after)[~own & valid],
                                np.asarray(before)[~own & valid])
  assert not np.allclose(np.asarray(after)[own], np.asarray(before)[own])


def test_disabled_group_has_no_parameters():
  x, context = tokens(), encoder_context()
  spec = AdapterSpec(kind="omni_smola", experts_per_group={"mm": 0, "vis": 2, "txt": 2})
  adapter = init(make_layer(spec), x, context)["params"]["adapter"]
  assert sorted(adapter) == ["txt", "vis"]


def test_bfloat16_activations_keep_router_in_float32_and_track_float32():
  x, context = tokens(), encoder_context()
  spec = ALL_SPECS["omni_sequence"]
  full = make_layer(spec)
  half = full.clone(dtype=jnp.bfloat16)
  variables = perturb_adapter(init(full, x, context))
  y32 = full.apply(variables, x, context)
  y16 = half.apply(variables, x.astype(jnp.bfloat16), context)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=0.05, atol=0.1)
  assert variables["params"]["adapter"]["mm"]["router"]["slot_params"].dtype == jnp.float32


def test_specialist_adapter_adds_its_own_residual_on_top_of_the_generalists():
  x, context = tokens(), encoder_context()
  generalist = make_layer(ALL_SPECS["omni_sequence"])
  specialist = generalist.clone(adapters=dataclasses.replace(
      generalist.adapters, specialist_adapter=AdapterSpec(kind="lora", rank=2)))
  variables = perturb_adapter(init(specialist, x, context))
  assert {"adapter", "specialist_adapter"} <= set(variables["params"])
  only_generalist = {"params": {k: v for k, v in variables["params"].items()
                                if k != "specialist_adapter"}}
  lora = variables["params"]["specialist_adapter"]
  expected = (generalist.apply(only_generalist, x, context)
              + (x @ lora["lora_a"]) @ lora["lora_b"])
  np.testing.assert_allclose(specialist.apply(variables, x, context), expected,
                             rtol=1e-5, atol=1e-5)
