"""Gradient accumulation (NUM_MICROBATCHES): the full batch's update, and bad counts refused."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model_fixtures import make_batch, random_params
from omni_smola import launching
from omni_smola.model import PaliModel
from omni_smola.models import configs
from omni_smola.nn import AdapterSpec
from omni_smola.training import data_iterator, microbatches, partitioned_step, trainer
from omni_smola.training.train_state import TrainState, split_params

# Rows 0, 4 / 1, 5 / ... form the 4 microbatches: 1 + 2 vs ... vs 7 + 8 target tokens, so a
# mean of microbatch means weighs the short rows' tokens 5x more than the long rows' (its
# gradient differs from the full batch's by about its own size).
TARGET_LENGTHS = (1, 3, 5, 7, 2, 4, 6, 8)


def _small_model():
  """The tiny text model cut to one layer a side, LoRA on the MLP outputs: a cheap compile."""
  tiny = configs.get_config("tiny")
  text = dataclasses.replace(tiny.text, num_encoder_layers=1, num_decoder_layers=1)
  return PaliModel(dataclasses.replace(tiny, text=text, vision=None),
                   AdapterSpec(kind="lora", rank=2, sites=("mlp/wo",)))


def _one_device():
  return partitioned_step.Partitioner(
      mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model")))


def _one_step(model, params, mask, batch, num_microbatches, tx, partitioner=None):
  trainable, frozen = split_params(params, mask)
  state = TrainState(step=jnp.int32(0), trainable=trainable, opt_state=tx.init(trainable))
  step = partitioned_step.make_train_step(model, tx, lambda _: 0.1,
                                          num_microbatches=num_microbatches)
  if partitioner is None:
    return jax.jit(step)(state, frozen, batch, jax.random.PRNGKey(0))
  replicated = partitioner.replicated()
  shardings = lambda tree: jax.tree_util.tree_map(lambda _: replicated, tree)
  jitted = partitioned_step.jit_train_step(
      partitioner, step, shardings(state), shardings(frozen),
      partitioner.batch_sharding(batch))
  return jitted(state, frozen, partitioner.global_batch(batch, len(TARGET_LENGTHS)),
                jax.random.PRNGKey(0))


def _assert_trees_close(actual, expected, rtol=1e-5, scale_tol=1e-4):
  """Close to 1e-5, or to 1e-4 of the leaf's largest value.

  The second bound is float32 summation order: a gradient entry that cancels to near
  zero keeps the rounding of its terms, which are the size of the leaf's large entries.
  """
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                          jax.tree_util.tree_leaves(expected)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=scale_tol * (np.abs(b).max() + 1e-30),
                               err_msg=jax.tree_util.keystr(path))


def test_four_microbatches_give_the_full_batch_update_with_unequal_token_counts():
  model = _small_model()
  batch = make_batch(model, prompt_lengths=(3,) * 8, target_lengths=TARGET_LENGTHS,
                     target_width=8)
  params = random_params(model, batch)
  mask = model.trainable_mask(params)
  tokens_per_microbatch = batch["decoder_loss_weights"].reshape(2, 4, 8).sum(axis=(0, 2))
  assert list(tokens_per_microbatch) == [3, 7, 11, 15]
  # adamw's first moments are the gradients themselves (times 0.1), so the optimizer
  # state compares them directly; the parameters compare the update.
  tx = optax.adamw(0.1, weight_decay=0.0)
  whole_state, whole = _one_step(model, params, mask, batch, 1, tx)
  sliced_state, sliced = _one_step(model, params, mask, batch, 4, tx,
                                   partitioner=_one_device())
  _assert_trees_close(sliced_state.opt_state, whole_state.opt_state)
  _assert_trees_close(sliced_state.trainable, whole_state.trainable)
  for name in ("loss", "z_loss", "accuracy", "num_tokens", "num_examples", "step_loss",
               "grad_norm"):
    np.testing.assert_allclose(float(sliced[name]), float(whole[name]), rtol=1e-5,
                               err_msg=name)
  assert float(whole["num_tokens"]) == sum(TARGET_LENGTHS)


class WeightedToyModel:
  """A linear model whose rows carry different token weights, for the three normalisers."""

  def __init__(self, loss_normalizing_factor):
    self.loss_normalizing_factor = loss_normalizing_factor

  def loss_fn(self, params, batch, dropout_rng):
    del dropout_rng
    token_loss = jnp.sum((batch["x"] @ params["w"] - batch["y"]) ** 2, axis=-1)
    total = jnp.sum(token_loss * batch["weights"])
    num_tokens = jnp.sum(batch["weights"])
    factor = self.loss_normalizing_factor
    loss = (total / jnp.maximum(num_tokens, 1.0) if factor == "num_tokens"
            else total if factor is None else total / factor)
    return loss, {"loss": total, "num_tokens": num_tokens,
                  "num_examples": jnp.float32(batch["x"].shape[0])}


@pytest.mark.parametrize("factor", ["num_tokens", 7.0, None])
def test_accumulated_gradient_equals_the_full_batch_gradient_for_every_normaliser(factor):
  rng = np.random.RandomState(0)
  weights = np.zeros((8, 3), np.float32)
  for row, n in enumerate((0, 1, 3, 2, 3, 0, 1, 3)):
    weights[row, :n] = 1.0
  batch = {"x": rng.randn(8, 3, 4).astype(np.float32),
           "y": rng.randn(8, 3, 2).astype(np.float32), "weights": weights}
  params = {"w": rng.randn(4, 2).astype(np.float32)}
  mask = {"w": True}
  tx = optax.sgd(1.0)
  model = WeightedToyModel(factor)
  whole_state, whole = _one_step(model, params, mask, batch, 1, tx)
  sliced_state, sliced = _one_step(model, params, mask, batch, 4, tx)
  _assert_trees_close(sliced_state.trainable, whole_state.trainable)
  np.testing.assert_allclose(float(sliced["step_loss"]), float(whole["step_loss"]), rtol=1e-5)


def test_a_count_that_does_not_divide_the_host_batch_fails_before_anything_is_written(
    tmp_path):
  model_dir = tmp_path / "run"
  cfg = data_iterator.DatasetConfig("never_read", {"inputs": 8, "targets": 8}, batch_size=6)
  with pytest.raises(ValueError, match=r"NUM_MICROBATCHES=4 \(train.num_microbatches\) "
                     r"does not divide the per-host batch of 6 rows \(BATCH_SIZE=6"):
    trainer.train(model=PaliModel("tiny"), model_dir=str(model_dir), train_dataset_cfg=cfg,
                  train_steps=1, num_microbatches=4)
  assert not model_dir.exists()
  with pytest.raises(ValueError, match=r"NUM_MICROBATCHES=4 .*per-device batch of 2 rows "
                     r"\(BATCH_SIZE=16 over 8 devices\)"):
    microbatches.check_num_microbatches(4, 16, 8, "device")
  with pytest.raises(ValueError, match="NUM_MICROBATCHES.*positive integer, got 0"):
    partitioned_step.make_train_step(PaliModel("tiny"), optax.sgd(0.1), lambda _: 0.1,
                                     num_microbatches=0)


def test_num_microbatches_is_a_gin_macro_of_the_run_config():
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    launching.parse_gin(["models/tiny.gin", "adapters/lora.gin", "runs/generalist.gin"],
                        ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'mini_generalist'",
                         "TRAIN_STEPS = 1", "NUM_MICROBATCHES = 4"])
    bound = gin.query_parameter("omni_smola.training.trainer.train.num_microbatches")
    assert str(bound) == "%NUM_MICROBATCHES" and bound.scoped_configurable_fn() == 4
  finally:
    gin.clear_config()
