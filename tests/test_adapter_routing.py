"""Causality, router training signal, routing statistics and parameter counts."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapter_fixtures import (ALL_SPECS, BATCH, D_IN, D_OUT, LENGTH, encoder_context,
                              init, make_layer, perturb_adapter, tokens)
from omni_smola.nn import AdaptedDense, AdapterPlan, AdapterSpec, TokenContext
from omni_smola.nn.accounting import adapter_param_count

CAUSAL_SPECS = ["smola_sequence", "smola_token", "omni_sequence", "omni_token", "mixlora",
                "mole_token", "mole_instance"]


def decoder_context(batch=BATCH):
  prompt_side = jax.random.normal(jax.random.PRNGKey(9), (batch, D_IN))
  return TokenContext(causal=True, instance_features=prompt_side)


@pytest.mark.parametrize("name", CAUSAL_SPECS)
def test_causal_layers_ignore_future_tokens(name):
  x, context = tokens(), decoder_context()
  layer = make_layer(ALL_SPECS[name])
  variables = perturb_adapter(init(layer, x, context))
  before = layer.apply(variables, x, context)
  for t in (0, 3, LENGTH - 2):
    future_changed = x.at[:, t + 1:].add(
        jax.random.normal(jax.random.PRNGKey(t), x[:, t + 1:].shape))
    after = layer.apply(variables, future_changed, context)
    np.testing.assert_allclose(after[:, :t + 1], before[:, :t + 1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(after[:, t + 1:], before[:, t + 1:])


def test_sequence_routing_is_not_causal_when_the_layer_is_not():
  # The contrast that makes the causal test meaningful: Soft MoE mixes positions.
  x, context = tokens(), TokenContext()
  layer = make_layer(ALL_SPECS["smola_sequence"])
  variables = perturb_adapter(init(layer, x, context))
  after = layer.apply(variables, x.at[:, -1].add(3.0), context)
  assert not np.allclose(after[:, 0], layer.apply(variables, x, context)[:, 0])


@pytest.mark.parametrize("name", ["mixlora", "mole_instance"])
def test_instance_routing_in_a_causal_layer_requires_prompt_side_features(name):
  x = tokens()
  layer = make_layer(ALL_SPECS[name])
  with pytest.raises(ValueError, match="instance_features"):
    layer.init(jax.random.PRNGKey(0), x, TokenContext(causal=True))


def _router_paths(name):
  return {"smola_sequence": ["router"], "smola_token": ["router"],
          "omni_sequence": ["router"], "omni_token": ["router"],
          "mixlora": ["router_a", "router_b", "router_conditional"],
          "mole_token": ["router"], "mole_instance": ["router"]}[name]


@pytest.mark.parametrize("name", CAUSAL_SPECS)
def test_routers_receive_gradient_once_b_is_nonzero(name):
  x, context = tokens(), encoder_context()
  layer = make_layer(ALL_SPECS[name])
  variables = perturb_adapter(init(layer, x, context))
  target = jax.random.normal(jax.random.PRNGKey(3), (BATCH, LENGTH, D_OUT))

  def loss(adapter_params):
    params = dict(variables["params"], adapter=adapter_params)
    return jnp.sum((layer.apply({"params": params}, x, context) - target) ** 2)

  grads = jax.grad(loss)(variables["params"]["adapter"])
  flat = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  for router in _router_paths(name):
    router_grads = [g for path, g in flat.items() if f"'{router}'" in path]
    assert router_grads, f"no parameters under {router}"
    assert any(float(jnp.abs(g).max()) > 1e-7 for g in router_grads), router


def test_at_initialisation_only_b_gets_gradient():
  # B = 0 blocks the signal to A and the router: the documented cold start.
  x, context = tokens(), encoder_context()
  layer = make_layer(ALL_SPECS["smola_sequence"])
  variables = init(layer, x, context)

  def loss(adapter):
    outputs = layer.apply({"params": dict(variables["params"], adapter=adapter)}, x, context)
    return jnp.sum(jnp.sin(outputs))

  grads = jax.grad(loss)(variables["params"]["adapter"])["mm"]
  assert float(jnp.abs(grads["experts"]["expert_b"]).max()) > 0
  assert float(jnp.abs(grads["experts"]["expert_a"]).max()) == 0
  assert float(jnp.abs(grads["router"]["slot_params"]).max()) == 0


@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_parameter_counts_equal_closed_form(name):
  x, context = tokens(), encoder_context()
  variables = init(make_layer(ALL_SPECS[name]), x, context)
  counted = sum(v.size for v in jax.tree_util.tree_leaves(variables["params"]["adapter"]))
  assert counted == adapter_param_count(ALL_SPECS[name], D_IN, D_OUT)


def test_decoder_omni_smola_has_no_visual_group():
  x, context = tokens(), decoder_context()
  spec = ALL_SPECS["omni_token"]
  variables = init(make_layer(spec), x, context)
  assert sorted(variables["params"]["adapter"]) == ["mm", "txt"]
  counted = sum(v.size for v in jax.tree_util.tree_leaves(variables["params"]["adapter"]))
  assert counted == adapter_param_count(spec, D_IN, D_OUT, groups=("mm", "txt"))


@pytest.mark.parametrize("name", ["smola_sequence", "omni_sequence", "omni_token",
                                  "mixlora", "mole_token"])
def test_routing_stats_are_sown_only_on_request_and_loads_sum_to_valid_tokens(name):
  x, context = tokens(), encoder_context()
  layer = make_layer(ALL_SPECS[name])
  variables = perturb_adapter(init(layer, x, context))
  _, state = layer.apply(variables, x, context, mutable=["intermediates"])
  plain = layer.apply(variables, x, context, mutable=[])
  assert isinstance(plain, tuple) and plain[1] == {}
  stats = state["intermediates"]["adapter"]
  blocks = [stats[g] for g in ("mm", "vis", "txt") if g in stats] or [stats]
  valid_per_example = np.asarray(context.valid_mask(BATCH, LENGTH)).sum(axis=1)
  covered = np.zeros(BATCH)
  for block in blocks:
    load, count = block["expert_load"][0], block["token_count"][0]
    np.testing.assert_allclose(load.sum(axis=1), count, rtol=1e-5)
    assert np.all(np.asarray(block["routing_entropy"][0]) >= 0)
    covered += np.asarray(count)
  groups = 2 if "omni" in name else 1  # mm covers every token, vis + txt once more
  np.testing.assert_allclose(covered, groups * valid_per_example)


class _TwoProjections(nn.Module):
  """Projections at the parameter paths `mlp/wi_0` and `attention/query`."""
  spec: AdapterSpec

  @nn.compact
  def __call__(self, x, context):
    class Block(nn.Module):
      spec: AdapterSpec

      @nn.compact
      def __call__(self, x, context, name):
        return AdaptedDense(D_OUT, kernel_axes=("embed", "mlp"),
                            adapters=AdapterPlan(adapter=self.spec),
                            name=name)(x, context)

    return (Block(self.spec, name="mlp")(x, context, "wi_0"),
            Block(self.spec, name="attention")(x, context, "query"))


def test_adapter_sites_select_projections_by_their_parameter_path():
  spec = AdapterSpec(kind="lora", sites=("mlp/",))
  assert spec.applies_to("text/encoder/layers_0/mlp/wi_0")
  assert not spec.applies_to("text/encoder/layers_0/attention/query")
  params = init(_TwoProjections(spec), tokens(), TokenContext())["params"]
  assert "adapter" in params["mlp"]["wi_0"]
  assert "adapter" not in params["attention"]["query"]
