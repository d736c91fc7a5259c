"""The T5.1.1 / UL2 encoder-decoder alone: relative positions, sizes, options."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import random_like
from omni_smola.models import configs
from omni_smola.models.relative_position import relative_position_buckets
from omni_smola.models.t5 import EncoderDecoder

TEXT = configs.get_config("tiny").text
ENCODER_TOKENS = np.array([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]], np.int32)
DECODER_TOKENS = np.array([[0, 3, 4, 5, 1, 0], [0, 7, 8, 9, 10, 11]], np.int32)


def count_params(module, *inputs):
  shapes = jax.eval_shape(lambda *xs: module.init(jax.random.PRNGKey(0), *xs), *inputs)
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(shapes)))


def text_params(config=TEXT, seed=0):
  shapes = jax.eval_shape(lambda: EncoderDecoder(config).init(
      jax.random.PRNGKey(0), ENCODER_TOKENS, DECODER_TOKENS))
  return random_like(nn.unbox(shapes)["params"], seed)


def relative(key_minus_query, bidirectional):
  """The bucket of one relative position, read off a table of queries."""
  n = abs(key_minus_query) + 1
  if key_minus_query < 0:  # queries 0..n-1 against key 0
    return relative_position_buckets(n, 1, bidirectional)[n - 1, 0]
  return relative_position_buckets(1, n, bidirectional)[0, n - 1]


@pytest.mark.parametrize("key_minus_query,bucket", [
    (0, 0), (-1, 1), (-7, 7), (-8, 8), (-15, 9), (-16, 10), (-127, 15), (-128, 15),
    (-5000, 15), (1, 17), (16, 26), (5000, 31)])
def test_bidirectional_buckets_are_exact_near_and_logarithmic_far(key_minus_query, bucket):
  assert relative(key_minus_query, bidirectional=True) == bucket


@pytest.mark.parametrize("key_minus_query,bucket", [
    (0, 0), (5, 0), (-1, 1), (-15, 15), (-16, 16), (-20, 17), (-32, 21), (-127, 31),
    (-200, 31)])
def test_causal_buckets_put_all_future_keys_with_the_current_position(key_minus_query,
                                                                      bucket):
  assert relative(key_minus_query, bidirectional=False) == bucket


def test_buckets_depend_only_on_the_distance():
  table = relative_position_buckets(40, 40, bidirectional=True)
  for offset in range(-39, 40):
    assert len(set(np.diagonal(table, offset))) == 1


@pytest.mark.parametrize("name,published", [
    ("t5_1_1_base", 247_577_856),  # google/t5-v1_1-base
    ("t5_1_1_large", 783_150_080),  # google/t5-v1_1-large
])
def test_parameter_counts_match_published_t5_1_1(name, published):
  module = EncoderDecoder(configs.get_config(name).text)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  count = count_params(module, tokens, tokens)
  assert abs(count - published) / published < 0.01, count


def test_pali3_is_counted_without_allocating():
  from omni_smola.models.pali import Pali  # pylint: disable=import-outside-toplevel
  config = configs.get_config("pali3")
  image = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(
      lambda *xs: Pali(config).init(jax.random.PRNGKey(0), *xs), image, tokens, tokens))
  shapes = shapes["params"]
  sizes = {k: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(v))
           for k, v in shapes.items()}
  # ViT-G/14 without its head: 1,843M published with it (Zhai et al., 2022).
  assert abs(sizes["img"] - 1.843e9) / 1.843e9 < 0.01, sizes
  # UL2-3B at T5.1.1-XL's shape, with mT5's 250k vocabulary in and out.
  assert 3.6e9 < sizes["text"] < 3.9e9, sizes
  assert sizes["img_projection"] == 1664 * 2048 + 2048


def test_text_model_runs_alone_and_encodes_alone():
  module = EncoderDecoder(TEXT)
  params = text_params()
  logits = module.apply({"params": params}, ENCODER_TOKENS, DECODER_TOKENS)
  assert logits.shape == DECODER_TOKENS.shape + (TEXT.vocab_size,)
  assert logits.dtype == jnp.float32
  encoded = module.apply({"params": params}, ENCODER_TOKENS, method="encode")
  assert encoded.encoded.shape == ENCODER_TOKENS.shape + (TEXT.emb_dim,)
  np.testing.assert_array_equal(encoded.context.valid, ENCODER_TOKENS > 0)
  valid = (ENCODER_TOKENS > 0)[..., None]
  np.testing.assert_allclose(encoded.instance_features,
                             (encoded.encoded * valid).sum(1) / valid.sum(1), rtol=1e-5)


def test_tied_logits_are_the_embedding_transposed_over_sqrt_width():
  tied = dataclasses.replace(TEXT, logits_via_embedding=True)
  params = text_params()
  tied_params = {k: v for k, v in params.items()}
  tied_params["decoder"] = {k: v for k, v in params["decoder"].items() if k != "logits_dense"}
  untied = dict(params)
  untied["decoder"] = dict(params["decoder"])
  embedding = params["token_embedder"]["embedding"]
  untied["decoder"]["logits_dense"] = {"kernel": embedding.T / np.sqrt(TEXT.emb_dim)}
  expected = EncoderDecoder(TEXT).apply({"params": untied}, ENCODER_TOKENS, DECODER_TOKENS)
  got = EncoderDecoder(tied).apply({"params": tied_params}, ENCODER_TOKENS, DECODER_TOKENS)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_activations_keep_float32_params_and_logits():
  bf16 = EncoderDecoder(dataclasses.replace(TEXT, dtype="bfloat16"))
  shapes = jax.eval_shape(lambda: bf16.init(jax.random.PRNGKey(0), ENCODER_TOKENS,
                                            DECODER_TOKENS))
  assert {x.dtype for x in jax.tree_util.tree_leaves(nn.unbox(shapes))} == {np.dtype("float32")}
  logits, state = jax.eval_shape(lambda p: bf16.apply(
      {"params": p}, ENCODER_TOKENS, DECODER_TOKENS, mutable=["intermediates"]),
                                 nn.unbox(shapes)["params"])
  assert logits.dtype == jnp.float32
  assert state["intermediates"]["encoded"][0].dtype == jnp.bfloat16
  assert state["intermediates"]["decoder"]["pre_logits"][0].dtype == jnp.bfloat16


def test_remat_checkpoints_each_layer_and_keeps_the_function():
  params = text_params()
  remat = EncoderDecoder(dataclasses.replace(TEXT, remat=True))

  def loss(module, p):
    return jnp.mean(module.apply({"params": p}, ENCODER_TOKENS, DECODER_TOKENS) ** 2)

  np.testing.assert_allclose(loss(remat, params), loss(EncoderDecoder(TEXT), params),
                             rtol=1e-6)

  def checkpoints(module):
    eqns = jax.make_jaxpr(lambda p: loss(module, p))(params).jaxpr.eqns
    return sum(e.primitive.name in ("checkpoint", "remat", "remat2") for e in eqns)
  assert checkpoints(remat) == TEXT.num_encoder_layers + TEXT.num_decoder_layers
  assert checkpoints(EncoderDecoder(TEXT)) == 0


def test_dropout_is_random_per_rng_and_off_by_default():
  params = text_params()
  dropout = EncoderDecoder(dataclasses.replace(TEXT, dropout_rate=0.3))

  def logits(**kw):
    return np.asarray(dropout.apply({"params": params}, ENCODER_TOKENS, DECODER_TOKENS, **kw))

  # (`rbg` keys compile much faster than threefry ones on CPU; the model takes either.)
  dropped = [logits(enable_dropout=True, rngs={"dropout": jax.random.key(s, impl="rbg")})
             for s in (0, 0, 1)]
  np.testing.assert_array_equal(dropped[0], dropped[1])
  assert not np.allclose(dropped[0], dropped[2])
  reference = EncoderDecoder(TEXT).apply({"params": params}, ENCODER_TOKENS, DECODER_TOKENS)
  np.testing.assert_allclose(logits(), reference, rtol=1e-6)
  assert not np.allclose(dropped[0], reference)


@pytest.mark.parametrize("tied", [False, True])
def test_bfloat16_activations_still_project_to_the_vocabulary_in_float32(tied):
  # A bf16 product would round the logits to 8 bits of mantissa (errors of ~1e-2 here).
  config = dataclasses.replace(TEXT, dtype="bfloat16", logits_via_embedding=tied)
  model = EncoderDecoder(config)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), ENCODER_TOKENS,
                               DECODER_TOKENS))["params"]
  logits, state = model.apply({"params": params}, ENCODER_TOKENS, DECODER_TOKENS,
                              mutable=["intermediates"])
  pre_logits = np.asarray(state["intermediates"]["decoder"]["pre_logits"][0], np.float32)
  if tied:
    kernel = np.asarray(params["token_embedder"]["embedding"]).T / np.sqrt(config.emb_dim)
  else:
    kernel = np.asarray(params["decoder"]["logits_dense"]["kernel"])
  expected = np.einsum("bld,dv->blv", pre_logits, kernel.astype(np.float32))
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)
