"""MoME's pieces: deformable sampling, ADT, the instruction router, MoVE, the bottleneck MoLE."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multidevice import run_with_devices
from omni_smola.models.adt import ADT, ADTConfig
from omni_smola.models.move import MoVE, MoVEConfig
from omni_smola.nn import TokenContext
from omni_smola.nn.deformable_attention import (DeformableCrossAttention, bilinear_sample,
                                                valid_extent)
from omni_smola.nn.instruction_router import InstructionRouter, prompt_embedding
from omni_smola.nn.mome_mole import (BottleneckMoLE, experts_from_single_adapter,
                                     single_expert_broadcast)

SHARDING_CHECK = os.path.join(os.path.dirname(__file__), "multidevice_checks",
                              "move_sharding.py")
BATCH, INSTRUCTION_WIDTH = 2, 10
SMALL_ADT = ADTConfig(num_queries=4, num_layers=1, num_heads=2, num_points=3)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def random_params(module, *args, seed=7, scale=0.3):
  """Random parameters of the module's shapes: traced abstractly, nothing compiled."""
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args))["params"]
  rng = np.random.default_rng(seed)  # jax.random would compile a kernel per shape
  return jax.tree_util.tree_map(
      lambda leaf: jnp.asarray(scale * rng.standard_normal(leaf.shape), jnp.float32), shapes)


# --- numpy references ------------------------------------------------------------------

def numpy_bilinear(values, locations, extent, valid):
  """Loops over every point and corner: [b, h, w, n, c] at [b, q, n, p, 2] -> [b, q, n, p, c]."""
  values, locations, extent = map(np.asarray, (values, locations, extent))
  batch, height, width, _, channels = values.shape
  out = np.zeros(locations.shape[:4] + (channels,), np.float64)
  for b, q, n, p in np.ndindex(*locations.shape[:4]):
    y = locations[b, q, n, p, 0] * extent[b, 0] - 0.5
    x = locations[b, q, n, p, 1] * extent[b, 1] - 0.5
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    for row, row_weight in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
      for col, col_weight in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
        if 0 <= row < height and 0 <= col < width and (valid is None or valid[b, row, col]):
          out[b, q, n, p] += row_weight * col_weight * values[b, row, col, n]
  return out


def numpy_adaptive_pool(features, side):
  """PyTorch's adaptive average pooling: bin i spans [floor(i n / side), ceil((i+1) n / side))."""
  batch, height, width, depth = features.shape
  out = np.zeros((batch, side, side, depth))
  for i, j in np.ndindex(side, side):
    rows = slice(i * height // side, -(-(i + 1) * height // side))
    cols = slice(j * width // side, -(-(j + 1) * width // side))
    out[:, i, j] = features[:, rows, cols].mean((1, 2))
  return out.reshape(batch, side * side, depth)


def numpy_deformable_attention(params, queries, reference, features, valid):
  """The paper's formula, term by term, with `numpy_bilinear`."""
  p = jax.tree_util.tree_map(np.asarray, params)
  queries, features = np.asarray(queries, np.float64), np.asarray(features, np.float64)
  values = np.einsum("bhwd,dnc->bhwnc", features, p["value_kernel"]) + p["value_bias"]
  offsets = (np.einsum("bqd,dnpz->bqnpz", queries, p["offset_kernel"])
             + p["offset_bias"])
  logits = (np.einsum("bqd,dnp->bqnp", queries, p["weight_kernel"])
            + p["weight_bias"])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  extent = np.asarray(valid_extent(valid, *features.shape[1:3], features.shape[0]))
  locations = np.asarray(reference)[None, :, None, None] + offsets / extent[:, None, None, None]
  sampled = numpy_bilinear(values, locations, extent, valid)
  mixed = np.einsum("bqnpc,bqnp->bqnc", sampled, weights)
  return np.einsum("bqnc,ncd->bqd", mixed, p["out_kernel"]) + p["out_bias"]


# --- deformable sampling and attention ---------------------------------------------------

# Powers of two, so pixel centres (i + 0.5) / n are exact in float32.
MAP_SHAPE, NUM_QUERIES = (2, 4, 8, 8), 32
ATTENTION = DeformableCrossAttention(num_heads=2, num_points=3)


def _pixel_centres(height, width):
  rows, cols = np.meshgrid((np.arange(height) + 0.5) / height,
                           (np.arange(width) + 0.5) / width, indexing="ij")
  return np.stack([rows.reshape(-1), cols.reshape(-1)], -1).astype(np.float32)


@pytest.fixture(scope="module")
def attention():
  """(params, jitted apply) of one deformable cross-attention, shared by the tests."""
  queries = _normal(4, (MAP_SHAPE[0], NUM_QUERIES, 7))
  reference, features = jnp.asarray(_pixel_centres(4, 8)), _normal(3, MAP_SHAPE)
  valid = jnp.ones(MAP_SHAPE[:3], bool)
  params = random_params(ATTENTION, queries, reference, features, valid)
  apply = jax.jit(lambda params, *args: ATTENTION.apply({"params": params}, *args))
  return params, apply, (queries, reference, features)


SAMPLE = jax.jit(bilinear_sample)


def test_bilinear_sample_matches_numpy_reference_outside_points_and_padding_read_zero():
  values = _normal(0, (2, 4, 8, 2, 3))
  # Many points fall outside [0, 1]^2, some on the padded rows/cols of example 1.
  locations = np.random.default_rng(1).uniform(-0.4, 1.4, (2, 32, 2, 1, 2)).astype(np.float32)
  locations[:, 0] = -0.5  # more than a pixel beyond the top-left edge
  valid = np.ones((2, 4, 8), bool)
  valid[1, 3:, :] = valid[1, :, 6:] = False
  extent = valid_extent(jnp.asarray(valid), 4, 8, 2)
  np.testing.assert_array_equal(extent, [[4, 8], [3, 6]])
  sampled = SAMPLE(values, locations, extent, jnp.asarray(valid))
  np.testing.assert_allclose(sampled, numpy_bilinear(values, locations, extent, valid),
                             rtol=1e-5, atol=1e-6)
  assert not np.any(sampled[:, 0])


def test_points_at_pixel_centres_reproduce_the_feature_map_exactly(attention):
  values = _normal(2, (2, 4, 8, 2, 3))
  locations = np.broadcast_to(_pixel_centres(4, 8)[None, :, None, None], (2, 32, 2, 1, 2))
  valid = jnp.ones((2, 4, 8), bool)
  sampled = SAMPLE(values, locations, valid_extent(valid, 4, 8, 2), valid)
  np.testing.assert_array_equal(sampled[:, :, :, 0], values.reshape(2, 32, 2, 3))
  # The module: with zero offsets all points of a query sit on its reference point, so
  # whatever their weights it reads out(value(f)) at that pixel.
  params, apply, (queries, reference, features) = attention
  params = dict(params, offset_kernel=jnp.zeros_like(params["offset_kernel"]),
                offset_bias=jnp.zeros_like(params["offset_bias"]))
  out = apply(params, queries, reference, features, jnp.ones(MAP_SHAPE[:3], bool))
  value = (jnp.einsum("bhwd,dnc->bhwnc", features, params["value_kernel"])
           + params["value_bias"]).reshape(MAP_SHAPE[0], NUM_QUERIES, 2, 4)
  expected = jnp.einsum("bqnc,ncd->bqd", value, params["out_kernel"]) + params["out_bias"]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_deformable_attention_equals_numpy_reference_on_a_padded_map(attention):
  params, apply, (queries, _, features) = attention
  reference = np.random.default_rng(7).uniform(0, 1, (NUM_QUERIES, 2)).astype(np.float32)
  valid = np.ones(MAP_SHAPE[:3], bool)
  valid[0, 3:] = valid[0, :, 5:] = False
  out = apply(params, queries, reference, features, jnp.asarray(valid))
  np.testing.assert_allclose(
      out, numpy_deformable_attention(params, queries, reference, features, valid),
      rtol=1e-4, atol=1e-5)


# --- ADT ---------------------------------------------------------------------------------

def test_adt_on_a_padded_map_equals_adt_on_its_valid_crop():
  crop = _normal(9, (1, 3, 4, 8))
  padded = jnp.zeros((1, 5, 6, 8)).at[:, :3, :4].set(crop) + 100.0 * (
      jnp.zeros((1, 5, 6, 1)).at[:, 3:].set(1.0))  # padding holds junk
  valid = jnp.zeros((1, 5, 6), bool).at[:, :3, :4].set(True)
  adt = ADT(SMALL_ADT, out_features=6)
  params = random_params(adt, crop)
  both = jax.jit(lambda padded, valid, crop: (adt.apply({"params": params}, padded, valid),
                                              adt.apply({"params": params}, crop)))
  from_padded, from_crop = both(padded, valid, crop)  # one compilation for the two
  np.testing.assert_allclose(from_padded, from_crop, rtol=1e-4, atol=1e-5)


# --- the instruction router and MoVE -------------------------------------------------------

TOWERS = ("clip", "dinov2")
MOVE_CONFIG = MoVEConfig(tower_names=TOWERS, width=6, adt=SMALL_ADT)


def _move_inputs(seed=0):
  maps = [_normal(seed, (BATCH, 4, 4, 8)), _normal(seed + 1, (BATCH, 3, 5, 4))]
  return maps, _normal(seed + 2, (BATCH, INSTRUCTION_WIDTH))


@pytest.fixture(scope="module")
def move_params():
  maps, instruction = _move_inputs()
  return random_params(MoVE(MOVE_CONFIG), maps, instruction)


@pytest.fixture(scope="module")
def move_apply():
  return jax.jit(lambda params, maps, instruction: MoVE(MOVE_CONFIG).apply(
      {"params": params}, maps, instruction))


def test_router_weights_sum_to_one_and_depend_only_on_the_prompt(move_params, move_apply):
  embeddings = _normal(10, (BATCH, 7, INSTRUCTION_WIDTH))
  prompt_mask = jnp.arange(7)[None] < jnp.array([[5], [3]])
  instruction = prompt_embedding(embeddings, prompt_mask)
  # Tokens outside the prompt (targets, padding) do not move the embedding.
  np.testing.assert_array_equal(
      prompt_embedding(embeddings.at[:, 5:].add(3.0), prompt_mask), instruction)
  maps, _ = _move_inputs()
  other_maps, _ = _move_inputs(seed=20)
  _, aux = move_apply(move_params, maps, instruction)
  _, aux_other_images = move_apply(move_params, other_maps, instruction)
  weights = np.asarray(aux["tower_weights"])
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(aux_other_images["tower_weights"], weights)
  _, aux_other_prompt = move_apply(
      move_params, maps, prompt_embedding(embeddings.at[:, 0].add(3.0), prompt_mask))
  assert not np.allclose(aux_other_prompt["tower_weights"], weights)


def test_a_tower_weighted_zero_does_not_reach_the_output(move_params, move_apply):
  params = jax.tree_util.tree_map(lambda x: x, move_params)
  logits = params["tower_router"]["logits"]
  logits["kernel"] = logits["kernel"].at[:, 1].set(0.0)
  logits["bias"] = logits["bias"].at[1].set(-1e10)  # softmax weight exactly 0
  maps, instruction = _move_inputs()
  fused, aux = move_apply(params, maps, instruction)
  np.testing.assert_array_equal(aux["tower_weights"][:, 1], 0.0)
  fused_other, _ = move_apply(params, [maps[0], maps[1] * -3.0 + 1.0], instruction)
  np.testing.assert_array_equal(fused_other, fused)


def test_ablations_average_pool_and_addition_sum_the_pooled_towers():
  config = MoVEConfig(tower_names=TOWERS, width=6, transform="average_pool",
                      fusion="addition", adt=SMALL_ADT)
  maps, instruction = _move_inputs()
  model = MoVE(config)
  params = random_params(model, maps, instruction)
  assert set(params) == {"transform_clip", "transform_dinov2"}  # no router, no layers
  fused, aux = jax.jit(model.apply)({"params": params}, maps, instruction)
  np.testing.assert_array_equal(aux["tower_weights"], 1.0)
  expected = sum(numpy_adaptive_pool(np.asarray(m), 2)
                 @ params[f"transform_{t}"]["output_projection"]["kernel"]
                 + params[f"transform_{t}"]["output_projection"]["bias"]
                 for t, m in zip(TOWERS, maps))
  np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-5)


# --- MoME's MoLE -------------------------------------------------------------------------

MOLE = BottleneckMoLE(num_experts=4, bottleneck_dim=5)


def _mole_inputs():
  x = _normal(11, (3, 6, 12))
  context = TokenContext(valid=jnp.arange(6)[None] < jnp.array([[6], [4], [5]]), causal=True,
                         instance_features=_normal(12, (3, INSTRUCTION_WIDTH)))
  return x, context


@pytest.fixture(scope="module")
def mole_params():
  x, context = _mole_inputs()
  return random_params(MOLE, x, context)


@pytest.fixture(scope="module")
def mole_apply():
  """Jitted: params -> (residual, routing statistics) on `_mole_inputs()`."""
  x, context = _mole_inputs()
  return jax.jit(lambda params: MOLE.apply({"params": params}, x, context,
                                           mutable=["intermediates"]))


def test_mole_routes_each_example_to_exactly_one_expert(mole_params, mole_apply):
  x, context = _mole_inputs()
  out, state = mole_apply(mole_params)
  load = np.asarray(state["intermediates"]["expert_load"][0])  # [b, e]
  assert np.all((load > 0).sum(-1) == 1)
  np.testing.assert_array_equal(load.sum(-1), [6, 4, 5])
  p = jax.tree_util.tree_map(np.asarray, mole_params)
  valid = np.asarray(context.valid)
  for b, e in enumerate(load.argmax(-1)):  # the chosen expert's adapter, gate exactly 1
    hidden = np.maximum(np.asarray(x[b]) @ p["down_kernel"][e] + p["down_bias"][e], 0)
    expected = p["expert_scale"][e] * (hidden @ p["up_kernel"][e] + p["up_bias"][e])
    np.testing.assert_allclose(out[b], expected * valid[b, :, None], rtol=1e-5, atol=1e-5)


def test_mole_router_receives_a_gradient_through_the_hard_gate(mole_params):
  x, context = _mole_inputs()
  grads = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(MOLE.apply({"params": p}, x, context)))))(
      mole_params)
  for leaf in jax.tree_util.tree_leaves(grads["router"]):
    assert np.any(leaf != 0)


def test_stage_two_copies_the_single_adapter_into_every_expert(mole_params, mole_apply):
  x, context = _mole_inputs()
  single = BottleneckMoLE(num_experts=1, bottleneck_dim=5)
  single_params = random_params(single, x, context, seed=3)
  assert "router" not in single_params
  mixture = experts_from_single_adapter(mole_params, single_params)
  np.testing.assert_array_equal(mixture["router"]["hidden"]["kernel"],
                                mole_params["router"]["hidden"]["kernel"])
  np.testing.assert_allclose(mole_apply(mixture)[0],
                             single.apply({"params": single_params}, x, context),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="down_kernel: the single adapter has shape"):
    experts_from_single_adapter(mole_params, mole_params)


def test_a_scanned_stacks_single_expert_is_copied_along_its_expert_axis():
  layers, experts = 3, 4
  single = _normal(13, (layers, 1, 6, 5))  # [layer, expert, d, r]
  copied = np.asarray(single_expert_broadcast("down_kernel", single, (layers, experts, 6, 5)))
  for expert in range(experts):
    np.testing.assert_array_equal(copied[:, expert], np.asarray(single)[:, 0])
  with pytest.raises(ValueError, match=r"down_kernel: the single adapter has shape "
                     r"\(3, 2, 6, 5\), the mixture's experts \(3, 4, 6, 5\)"):
    single_expert_broadcast("down_kernel", _normal(14, (layers, 2, 6, 5)), (layers, 4, 6, 5))
  # Size 1 on another axis is no single expert: 4 experts' biases of width 1 are refused,
  # not broadcast to width 6.
  with pytest.raises(ValueError, match=r"up_bias: the single adapter has shape \(4, 1\)"):
    single_expert_broadcast("up_bias", _normal(15, (4, 1)), (4, 6))


# --- bad input ----------------------------------------------------------------------------

def test_bad_configurations_and_inputs_fail_naming_the_field_and_value():
  maps, instruction = _move_inputs()
  with pytest.raises(ValueError, match=r"ADTConfig.num_queries=25 \(a 5x5 query grid\) is "
                                       r"larger than transform_clip's feature grid 4x4"):
    random_params(MoVE(MoVEConfig(tower_names=TOWERS, width=6,
                                  adt=ADTConfig(num_queries=25))), maps, instruction)
  with pytest.raises(ValueError, match="ADTConfig.num_queries=6 is not a positive square"):
    ADTConfig(num_queries=6).grid_side
  with pytest.raises(ValueError, match=r"MoVEConfig.tower_names=\(\)"):
    MoVEConfig(tower_names=(), width=6)
  with pytest.raises(ValueError, match="MoVEConfig.fusion='router' over one tower"):
    MoVEConfig(tower_names=("clip",), width=6)
  with pytest.raises(ValueError, match="MoVEConfig.transform='deformable'; known"):
    MoVEConfig(tower_names=TOWERS, width=6, transform="deformable")
  with pytest.raises(ValueError, match=r"InstructionRouter.num_choices must be >= 1 "
                                       r"\(one per tower or expert\), got 0"):
    random_params(InstructionRouter(0), instruction)
  with pytest.raises(ValueError, match="names 2 towers, got 1 feature maps"):
    random_params(MoVE(MOVE_CONFIG), maps[:1], instruction)
  with pytest.raises(ValueError, match=r"validity mask has shape \(2, 4, 5\)"):
    random_params(MoVE(MOVE_CONFIG), maps, instruction, [None, jnp.ones((2, 4, 5), bool)])
  x, context = _mole_inputs()
  with pytest.raises(ValueError, match="TokenContext.instance_features"):
    random_params(MOLE, x, TokenContext(causal=True))


def test_eight_devices_equal_one_for_a_move_forward_and_backward():
  output = run_with_devices(SHARDING_CHECK, num_devices=8)
  assert "OK move mesh=(2, 4)" in output, output
