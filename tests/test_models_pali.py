"""The PaLI-like model: adapter wiring, causality, padding, layouts (tiny config)."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from model_fixtures import (ADAPTER_SPECS, logits, make_batch, param_shapes, path_names,
                            perturb_adapters, random_like, random_params, tiny_model,
                            with_initial_adapters)
from omni_smola.model import PaliModel
from omni_smola.models import configs
from omni_smola.models.vit import ViT, resample_position_embedding
from omni_smola.nn import AdapterConfigError, AdapterPlan, AdapterSpec


@pytest.fixture(scope="module")
def batch():
  return make_batch(tiny_model())


@pytest.fixture(scope="module")
def backbone(batch):
  """(params, logits) of the frozen backbone (no adapter)."""
  params = random_params(tiny_model(), batch)
  return params, logits(tiny_model(), params, batch)


@pytest.fixture(scope="module")
def initialised(batch, backbone):
  """Per adapter kind: (params, logits) with freshly initialised adapters."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = with_initial_adapters(tiny_model(name), backbone[0], batch, seed=1)
    return cache[name]
  return get


def test_parameter_paths_follow_t5x_and_big_vision_layouts(batch):
  shapes = {k: v.value.shape for k, v in path_names(param_shapes(tiny_model(), batch)).items()}
  cfg = configs.get_config("tiny")
  text, vit = cfg.text, cfg.vision
  expected = {
      "text/token_embedder/embedding": (text.vocab_size, text.emb_dim),
      "text/encoder/relpos_bias/rel_embedding": (text.num_heads, 32),
      "text/encoder/layers_1/pre_attention_layer_norm/scale": (text.emb_dim,),
      "text/encoder/layers_0/attention/query/kernel": (text.emb_dim, text.num_heads,
                                                       text.head_dim),
      "text/encoder/layers_0/attention/out/kernel": (text.num_heads, text.head_dim,
                                                     text.emb_dim),
      "text/encoder/layers_0/mlp/wi_1/kernel": (text.emb_dim, text.mlp_dim),
      "text/encoder/layers_0/mlp/wo/kernel": (text.mlp_dim, text.emb_dim),
      "text/encoder/encoder_norm/scale": (text.emb_dim,),
      "text/decoder/relpos_bias/rel_embedding": (text.num_heads, 32),
      "text/decoder/layers_1/encoder_decoder_attention/key/kernel": (
          text.emb_dim, text.num_heads, text.head_dim),
      "text/decoder/layers_0/pre_cross_attention_layer_norm/scale": (text.emb_dim,),
      "text/decoder/decoder_norm/scale": (text.emb_dim,),
      "text/decoder/logits_dense/kernel": (text.emb_dim, text.vocab_size),
      "img/embedding/kernel": (vit.patch_size, vit.patch_size, 3, vit.width),
      "img/pos_embedding": (1, vit.num_patches, vit.width),
      "img/Transformer/encoderblock_1/MultiHeadDotProductAttention_0/value/bias": (
          vit.num_heads, vit.width // vit.num_heads),
      "img/Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel": (vit.mlp_dim, vit.width),
      "img/Transformer/encoder_norm/bias": (vit.width,),
      "img_projection/kernel": (vit.width, text.emb_dim),
  }
  for path, shape in expected.items():
    assert shapes.get(path) == shape, path
  assert not any("relpos_bias" in p for p in shapes if "/layers_" in p)  # one per stack


@pytest.mark.parametrize("name", sorted(ADAPTER_SPECS))
def test_untrained_adapters_leave_the_logits_of_the_backbone_unchanged(name, backbone,
                                                                       initialised):
  params, at_init = initialised(name)
  assert any("/adapter/" in p for p in path_names(params))
  np.testing.assert_array_equal(at_init, backbone[1])


@pytest.mark.parametrize("name", sorted(ADAPTER_SPECS))
def test_decoder_is_causal_with_trained_adapters(name, batch, backbone, initialised):
  params = perturb_adapters(initialised(name)[0])
  model = tiny_model(name)
  reference = logits(model, params, batch)
  assert not np.allclose(reference, backbone[1], atol=1e-3)  # the adapters do matter
  t = 2
  changed = dict(batch)
  changed["decoder_input_tokens"] = batch["decoder_input_tokens"].copy()
  changed["decoder_input_tokens"][:, t + 1:] = 7
  out = logits(model, params, changed)
  np.testing.assert_allclose(out[:, :t + 1], reference[:, :t + 1], atol=1e-6, rtol=1e-6)
  assert not np.allclose(out[:, t + 1:], reference[:, t + 1:], atol=1e-3)


@pytest.mark.parametrize("name", ["omni_smola_sequence"])
def test_padded_prompt_tokens_do_not_change_the_outputs(name, batch, initialised):
  params = perturb_adapters(initialised(name)[0])
  model = tiny_model(name)
  longer = dict(batch)  # every row is padded in both; 4 more padding tokens here
  longer["encoder_input_tokens"] = np.pad(batch["encoder_input_tokens"], ((0, 0), (0, 4)))
  # Float noise only (softmax sums over more masked zeros): a leak would be O(0.1).
  np.testing.assert_allclose(logits(model, params, longer), logits(model, params, batch),
                             atol=1e-4, rtol=1e-4)


def test_adapter_sites_select_projections_by_path(batch):
  def adapted(spec):
    names = path_names(param_shapes(PaliModel("tiny", spec), batch))
    return {p.split("/adapter/")[0] for p in names if "/adapter/" in p}

  mlp_only = adapted(AdapterSpec(kind="lora", sites=("mlp/",)))
  assert mlp_only and all("/mlp/" in p for p in mlp_only)
  assert {p.rsplit("/", 1)[1] for p in mlp_only} == {"wi_0", "wi_1", "wo"}
  decoder_only = adapted(AdapterSpec(kind="lora", sites=("^text/decoder/",)))
  assert decoder_only and all(p.startswith("text/decoder/") for p in decoder_only)
  # The paper's placement: every attention and MLP projection of the text encoder.
  encoder_only = adapted(AdapterSpec(kind="lora", sites=("^text/encoder/",)))
  assert encoder_only == {p for p in everywhere_paths(batch) if p.startswith("text/encoder/")}
  assert len(encoder_only) == 7 * configs.get_config("tiny").text.num_encoder_layers
  everywhere = adapted(AdapterSpec(kind="lora"))
  layer_sites = {p for p in everywhere if "encoder/layers_0/" in p}
  assert len(layer_sites) == 7  # q, k, v, o, wi_0, wi_1, wo
  assert not any(p.startswith("img") for p in everywhere)  # the ViT is frozen by default
  tiny = configs.get_config("tiny")
  adapted_vit = dataclasses.replace(tiny, vision=dataclasses.replace(tiny.vision, adapt=True))
  names = path_names(param_shapes(PaliModel(adapted_vit, AdapterSpec(kind="lora")), batch))
  vit = {p.split("/adapter/")[0] for p in names if "/adapter/" in p}
  assert any(p.startswith("img/Transformer/encoderblock_0/MlpBlock_0/") for p in vit)


def everywhere_paths(batch):
  names = path_names(param_shapes(PaliModel("tiny", AdapterSpec(kind="lora")), batch))
  return {p.split("/adapter/")[0] for p in names if "/adapter/" in p}


@pytest.mark.parametrize("slot,sites", [
    ("adapter", ("^encoder/",)),  # the hand-built site names of old: no longer a path
    ("adapter", ("mlp/", "attention/quer$")),  # one typo among good regexes
    ("specialist_adapter", ("^img/",)),  # the ViT carries no adapter unless `vision.adapt`
])
def test_a_sites_regex_that_matches_no_projection_stops_the_build(batch, slot, sites):
  spec = AdapterSpec(kind="lora", sites=sites)
  model = (PaliModel("tiny", spec) if slot == "adapter" else
           PaliModel("tiny", AdapterPlan(AdapterSpec(kind="lora"), specialist_adapter=spec)))
  with pytest.raises(AdapterConfigError) as error:
    param_shapes(model, batch)
  message = str(error.value)
  bad = [p for p in sites if p not in ("mlp/",)][0]
  assert message.startswith(f"{slot}: ") and repr(bad) in message, message
  assert "text/encoder/layers_{i}/attention/query" in message  # real paths, to write it right


def test_vit_resamples_position_embeddings_for_another_resolution():
  cfg = configs.get_config("tiny").vision
  posemb = np.random.RandomState(0).randn(1, cfg.num_patches, cfg.width).astype(np.float32)
  np.testing.assert_allclose(resample_position_embedding(posemb, cfg.num_patches), posemb,
                             atol=1e-6)
  constant = np.ones((1, 4, 3), np.float32)
  np.testing.assert_allclose(resample_position_embedding(constant, (3, 5)),
                             np.ones((1, 15, 3)), atol=1e-6)
  vit = ViT(cfg)
  image = np.zeros((1, 2 * cfg.image_size, 2 * cfg.image_size, 3), np.float32)
  params = random_like(nn.unbox(jax.eval_shape(
      vit.init, jax.random.PRNGKey(0), image[:, :cfg.image_size, :cfg.image_size])))
  tokens = vit.apply(params, image)
  assert tokens.shape == (1, 4 * cfg.num_patches, cfg.width)


def test_random_backbone_outputs_depend_on_image_and_prompt(batch):
  model = tiny_model()
  params = random_params(model, batch)
  reference = logits(model, params, batch)
  for key in ("image", "encoder_input_tokens"):
    changed = dict(batch)
    changed[key] = batch[key][::-1].copy()
    assert not np.allclose(logits(model, params, changed), reference, atol=1e-3), key
