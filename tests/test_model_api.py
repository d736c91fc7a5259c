"""The t5x-shaped model API the trainer and the evaluator use."""
import dataclasses
import os

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from model_fixtures import make_batch, param_shapes, path_names, random_params, tiny_model
from omni_smola import partitioning
from omni_smola.models import configs
from omni_smola.model import PaliModel, cross_entropy_with_logits
from omni_smola.nn import AdapterPlan, AdapterSpec

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "gin_configs", "models")


@pytest.fixture(scope="module")
def setup():
  model = tiny_model("lora")
  batch = make_batch(model)
  return model, batch, random_params(model, batch)


def test_initial_variables_name_every_axis_and_shard_on_a_mesh(setup):
  model, batch, _ = setup
  variables = jax.eval_shape(lambda: model.get_initial_variables(
      jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()}))
  assert set(variables) == {"params"}
  leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  shardings = partitioning.variables_sharding(variables, partitioning.create_mesh(),
                                              partitioning.logical_axis_rules())
  assert len(jax.tree_util.tree_leaves(shardings)) == len(leaves)
  specs = nn.get_partition_spec(variables)["params"]
  assert tuple(specs["text"]["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]) == ("embed", "mlp")


def test_loss_metrics_are_token_sums_and_the_loss_their_mean(setup):
  model, batch, params = setup
  loss, metrics = model.loss_fn(params, batch, None)
  logits = np.asarray(model._logits(params, batch))  # pylint: disable=protected-access
  targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  target_logp = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - log_z
  z_loss = 1e-4 * log_z ** 2
  np.testing.assert_allclose(metrics["num_tokens"], weights.sum())
  np.testing.assert_allclose(metrics["z_loss"], (z_loss * weights).sum(), rtol=1e-4)
  np.testing.assert_allclose(metrics["loss"], ((z_loss - target_logp) * weights).sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"],
                             ((logits.argmax(-1) == targets) * weights).sum())
  np.testing.assert_allclose(loss, metrics["loss"] / weights.sum(), rtol=1e-6)
  # Zero-weight positions do not count; dropout_rng=None is deterministic.
  changed = dict(batch, decoder_target_tokens=np.where(weights > 0, targets, 7))
  again, _ = model.loss_fn(params, changed, None)
  np.testing.assert_allclose(again, loss, rtol=1e-6)


def test_label_smoothing_is_the_kl_to_the_smoothed_one_hot():
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 3, 6).astype(np.float32)
  targets = rng.randint(0, 6, (2, 3))
  smoothing = 0.3
  soft = np.full((2, 3, 6), smoothing / 5)
  np.put_along_axis(soft, targets[..., None], 1 - smoothing, axis=-1)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  kl = (soft * (np.log(soft) - log_p)).sum(-1)
  loss, z = cross_entropy_with_logits(logits, targets, smoothing, z_loss=0.0)
  np.testing.assert_allclose(loss, kl, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(z) == 0)
  perfect, _ = cross_entropy_with_logits(np.log(soft).astype(np.float32), targets, smoothing)
  np.testing.assert_allclose(perfect, 0.0, atol=1e-5)


def test_trainable_mask_freezes_the_backbone_unless_told_otherwise(setup):
  model, batch, _ = setup
  variables = param_shapes(model, batch)  # boxed: a box counts as one leaf
  names = path_names(variables)

  def trainable(**kw):
    mask = model.trainable_mask(variables, **kw)
    assert (jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(
        variables, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
    return {name for name, value in path_names(mask).items() if value}

  adapters = {n for n in names if "/adapter/" in n}
  assert adapters and trainable() == adapters
  assert trainable(mode="full") == set(names)
  decoder = {n for n in names if n.startswith("text/decoder/")}
  assert trainable(overrides=((r"^text/decoder/", True),)) == adapters | decoder
  # The first matching rule wins.
  assert trainable(mode="full", overrides=(("adapter", False), (".*", True))) == (
      set(names) - adapters)
  with pytest.raises(ValueError, match="mode"):
    model.trainable_mask(variables, mode="frozen")


def test_a_specialist_adapter_stacks_on_the_generalist_one(setup):
  _, batch, _ = setup
  model = PaliModel("tiny", AdapterPlan(
      adapter=AdapterSpec(kind="omni_smola", rank=2),
      specialist_adapter=AdapterSpec(kind="lora", rank=2, sites=("mlp/",))))
  names = path_names(param_shapes(model, batch))
  generalist = {n.split("/adapter/")[0] for n in names if "/adapter/" in n}
  specialist = {n.split("/specialist_adapter/")[0] for n in names
                if "/specialist_adapter/" in n}
  assert specialist and specialist == {s for s in generalist if "/mlp/" in s}
  recipe = model.trainable_mask(param_shapes(model, batch), overrides=(
      ("(^|/)specialist_adapter/", True), (".*", False)))
  assert {n for n, v in path_names(recipe).items() if v} == {
      n for n in names if "/specialist_adapter/" in n}


def test_score_batch_sums_token_log_likelihoods_and_exposes_intermediates(setup):
  model, batch, params = setup
  scores, intermediates = model.score_batch(params, batch, return_intermediates=True)
  np.testing.assert_allclose(scores, np.asarray(intermediates["token_scores"]).sum(-1),
                             rtol=1e-6)
  np.testing.assert_allclose(model.score_batch(params, batch), scores, rtol=1e-6)
  assert np.all(np.asarray(scores) < 0)
  assert intermediates["img_tokens"][0].shape[:2] == (2, 4)  # 16px image, 8px patches
  assert intermediates["text"]["encoded"][0].shape[1] == 4 + 5  # [visual; prompt]
  assert "pre_logits" in intermediates["text"]["decoder"]


def test_sampled_decodes_are_sorted_and_prompts_force_the_targets(setup):
  model, batch, params = setup
  tokens, aux = model.predict_batch_with_aux(
      params, batch, rng=jax.random.PRNGKey(0), num_decodes=3, return_all_decodes=True,
      prompt_with_targets=True,
      decoder_params={"decoding": "sample", "temperature": 1.0, "top_k": 20})
  assert tokens.shape == (2, 3) + batch["decoder_input_tokens"].shape[1:]
  assert np.all(np.diff(np.asarray(aux["scores"]), axis=1) >= 0)  # best last
  # Output i is forced to decoder input i + 1 (the first targets; both rows have >= 3).
  targets = np.broadcast_to(batch["decoder_target_tokens"][:, None, :3], (2, 3, 3))
  np.testing.assert_array_equal(np.asarray(tokens)[:, :, :3], targets)
  assert len({tuple(t) for t in np.asarray(tokens).reshape(6, -1)}) > 2  # really sampled
  with pytest.raises(ValueError, match="decoder_params"):
    model.predict_batch_with_aux(params, batch, decoder_params={"beams": 3})


def test_model_gin_files_bind_MODEL_with_the_named_configs_dimensions():  # noqa: N802
  names = sorted(f[:-len(".gin")] for f in os.listdir(GIN_DIR) if f.endswith(".gin"))
  assert names == sorted(configs.CONFIGS)
  for name in names:
    gin.clear_config()
    try:
      gin.parse_config_file(os.path.join(GIN_DIR, f"{name}.gin"))
      model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    finally:
      gin.clear_config()
    assert isinstance(model, PaliModel) and model.config == configs.CONFIGS[name], name
    assert model.config_name == name
    assert model.has_vision == (name in ("tiny", "mini", "pali3", "tiny_mome", "mini_mome",
                                         "pali3_mome"))


def test_bad_settings_fail_early_naming_the_field():
  class Vocabulary:
    vocab_size = 600
  with pytest.raises(ValueError, match="vocab_size=512"):
    PaliModel("tiny", output_vocabulary=Vocabulary())
  tiny = configs.CONFIGS["tiny"]
  wider = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, vocab_size=600))
  assert PaliModel(wider, output_vocabulary=Vocabulary()).vocab_size == 600
  with pytest.raises(ValueError, match="decoding"):
    PaliModel("tiny", decoding="nucleus")
  with pytest.raises(KeyError, match="unknown model config"):
    PaliModel("huge")
  with pytest.raises(TypeError, match="PaliModel.adapters must be an AdapterPlan"):
    PaliModel("tiny", "lora")
  assert PaliModel("tiny", AdapterSpec(kind="lora")).adapters.adapter.kind == "lora"
