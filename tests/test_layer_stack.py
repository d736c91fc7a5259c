"""Scanned layers compute what unrolled layers compute, and either layout loads into the other."""
import dataclasses

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest
from flax import traverse_util

from model_fixtures import make_batch, param_shapes, random_params
from omni_smola import param_layout
from omni_smola.analysis import collect
from omni_smola.checkpoints import CheckpointMismatchError, load_pretrained
from omni_smola.model import PaliModel
from omni_smola.models import configs
from omni_smola.nn import AdapterSpec

TINY = configs.CONFIGS["tiny"]
# Sequence routing, every group: the text stacks carry routed adapters; the (scanned) ViT's
# output reaches every encoder statistic through the visual tokens.
SPEC = AdapterSpec(kind="omni_smola", rank=2, experts_per_group={"mm": 2, "vis": 2, "txt": 2})


def _config(scan: bool, **text_fields):
  return dataclasses.replace(
      TINY, text=dataclasses.replace(TINY.text, scan_layers=scan, **text_fields),
      vision=dataclasses.replace(TINY.vision, scan_layers=scan))


def _flat(params):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def _nested(flat):
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


@pytest.fixture(scope="module")
def pair():
  unrolled, scanned = PaliModel(_config(False), SPEC), PaliModel(_config(True), SPEC)
  batch = make_batch(unrolled)
  params = random_params(unrolled, batch)
  stacked = _nested(param_layout.stack_layers(_flat(params)))
  return unrolled, scanned, batch, params, stacked


@pytest.fixture(scope="module")
def boxes(pair):
  """The boxed abstract parameters of (unrolled, scanned): one trace each."""
  unrolled, scanned, batch, _, _ = pair
  return param_shapes(unrolled, batch), param_shapes(scanned, batch)


def test_scanned_parameters_are_the_unrolled_ones_stacked_on_a_leading_layer_axis(boxes):
  unrolled_boxes, scanned_boxes = boxes
  flat = {k: v.value.shape for k, v in _flat(scanned_boxes).items()}
  expected = {k: v.value.shape for k, v in _flat(unrolled_boxes).items()}
  assert param_layout.stack_layers({k: np.zeros(s) for k, s in expected.items()}).keys() == (
      flat.keys())
  depth = TINY.text.num_encoder_layers
  assert flat["text/encoder/layers/mlp/wi_0/kernel"] == (depth, TINY.text.emb_dim,
                                                       TINY.text.mlp_dim)
  assert flat["text/encoder/layers/mlp/wi_0/adapter/mm/router/scale"][0] == depth
  assert flat["img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"][0] == TINY.vision.depth
  assert _flat(scanned_boxes)["text/decoder/layers/mlp/wo/kernel"].names == (
      "layers", "mlp", "embed")


def test_scanned_and_unrolled_models_agree_on_per_layer_routing_statistics(pair):
  unrolled, scanned, batch, params, stacked = pair
  batch = dict(batch, **{collect.ROW_VALID: np.ones(2, bool)})
  statistics = jax.jit(collect.routing_statistics, static_argnums=0)
  got = statistics(scanned, stacked, batch)
  expected = statistics(unrolled, params, batch)
  assert got.keys() == expected.keys()
  assert any(k.startswith("text/decoder/layers_1/") for k in got)
  assert any(k.startswith("text/encoder/layers_1/") and "|vis|" in k for k in got)
  # Every statistic depends on the forward pass up to its layer (the scanned image tower's
  # reach the text encoder's); a scan orders some float sums differently: agreement to noise.
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_scanned_and_unrolled_models_agree_on_gradients_and_cached_decoding():
  # Text only, LoRA: the cheapest model whose decoder caches per layer and trains adapters.
  lora = AdapterSpec(kind="lora", rank=2)
  unrolled = PaliModel(dataclasses.replace(_config(False), vision=None), lora)
  scanned = PaliModel(dataclasses.replace(_config(True), vision=None), lora)
  batch = make_batch(unrolled)
  params = random_params(unrolled, batch)
  stacked = _nested(param_layout.stack_layers(_flat(params)))
  grad = jax.jit(jax.grad(lambda p, m: m.loss_fn(p, batch, None)[0]), static_argnums=1)
  got = param_layout.unstack_layers(_flat(grad(stacked, scanned)))
  expected = _flat(grad(params, unrolled))
  assert got.keys() == expected.keys()
  for name in expected:
    scale = np.abs(expected[name]).max()
    np.testing.assert_allclose(got[name], expected[name], atol=1e-4 * scale, err_msg=name)
  # Greedy and beam search: beams reorder the cache's rows, which a scan stacks second.
  decode = jax.jit(lambda p, m: (
      m.predict_batch_with_aux(p, batch)[0],
      m.predict_batch_with_aux(p, batch, decoder_params={"decoding": "beam"}, num_decodes=2,
                               return_all_decodes=True)[0]), static_argnums=1)
  for got_tokens, expected_tokens in zip(decode(stacked, scanned), decode(params, unrolled)):
    np.testing.assert_array_equal(got_tokens, expected_tokens)


def test_a_per_layer_checkpoint_loads_into_a_scanned_model_and_back(pair, boxes):
  _, _, _, params, stacked = pair
  unrolled_boxes, scanned_boxes = boxes
  loaded = load_pretrained(nn.unbox(scanned_boxes), params)  # per-layer into scanned
  for name, value in _flat(stacked).items():
    np.testing.assert_array_equal(_flat(loaded)[name], value, err_msg=name)
  back = load_pretrained(nn.unbox(unrolled_boxes), stacked)
  for name, value in _flat(params).items():
    np.testing.assert_array_equal(_flat(back)[name], value, err_msg=name)


def test_a_checkpoint_of_another_depth_is_refused_naming_the_stack_and_both_depths(pair):
  _, _, batch, params, _ = pair
  deeper = PaliModel(_config(True, num_encoder_layers=3), SPEC)
  with pytest.raises(CheckpointMismatchError,
                     match=r"text/encoder/layers/.*checkpoint has 2 layers, the model 3"):
    load_pretrained(nn.unbox(param_shapes(deeper, batch)), params)


def test_the_remat_policy_is_a_named_choice_checked_at_construction():
  with pytest.raises(ValueError, match=r"T5Config.remat_policy='dots'.*dots_saveable"):
    dataclasses.replace(TINY.text, remat_policy="dots")
  try:
    gin.parse_config("import omni_smola.models.configs\n"
                     "omni_smola.models.configs.ViTConfig.remat_policy = 'bogus'")
    with pytest.raises(ValueError, match="ViTConfig.remat_policy='bogus'"):
      configs.ViTConfig(width=8, depth=1, mlp_dim=8, num_heads=2)
  finally:
    gin.clear_config()


def test_a_scanned_model_exports_the_same_files_as_its_unrolled_twin(tmp_path):
  from omni_smola import export  # pylint: disable=g-import-not-at-top
  lora = AdapterSpec(kind="lora", rank=2)
  unrolled = PaliModel(dataclasses.replace(_config(False), vision=None), lora)
  params = random_params(unrolled, make_batch(unrolled))
  per_layer = _flat(params)
  for name, flat, scan in (("unrolled", per_layer, False),
                           ("scanned", param_layout.stack_layers(per_layer), True)):
    config = dataclasses.replace(_config(scan), vision=None)
    export.export_params(flat, config, unrolled.adapters, str(tmp_path / name), merge=True)
  for name in ("text/model.safetensors", "text/config.json"):
    scanned, unrolled_file = tmp_path / "scanned" / name, tmp_path / "unrolled" / name
    assert scanned.read_bytes() == unrolled_file.read_bytes(), name
