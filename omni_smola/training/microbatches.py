"""Gradient accumulation (t5x's `num_microbatches`): a batch's update, a slice at a time.

The train step (`partitioned_step.make_train_step`) calls `accumulated_gradients`
when NUM_MICROBATCHES > 1: the batch is cut into M microbatches, a `lax.scan`
runs forward and backward on one at a time (activation memory of B/M rows) and
sums their gradients and metrics, then one division gives the full batch's loss
and gradient, so the optimizer sees the same update as with M = 1.

Why sums and not means: the model's loss is its summed token loss divided by a
normaliser (`PaliModel.loss_normalizing_factor`). With 'num_tokens' that is the
batch's weighted token count, so the mean of the microbatches' losses is not the
batch's loss: a microbatch with few target tokens would weigh as much as one
with many. Each microbatch therefore contributes the gradient of its *summed*
loss (`metrics['loss']`), and the accumulated sum is divided once by the whole
batch's normaliser: max(total tokens, 1) for 'num_tokens', the number itself for
a number, 1 for None (a sum stays a sum).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_smola.training.train_state import Params, merge_params


def _check_positive(num_microbatches) -> None:
  if (not isinstance(num_microbatches, int) or isinstance(num_microbatches, bool)
      or num_microbatches < 1):
    raise ValueError("NUM_MICROBATCHES (train.num_microbatches) must be a positive integer, "
                     f"got {num_microbatches!r}")


def check_num_microbatches(num_microbatches, batch_size: int, num_shards: int,
                           shard: str) -> None:
  """Errors name NUM_MICROBATCHES and the numbers that do not divide.

  Every microbatch takes the same number of rows from each of the `num_shards`
  shards (hosts, or devices along `data`), so a shard's rows must split evenly.
  """
  _check_positive(num_microbatches)
  if batch_size % num_shards:
    return  # `data_iterator.check_batch_size` reports this one.
  rows = batch_size // num_shards
  if rows % num_microbatches:
    raise ValueError(
        f"NUM_MICROBATCHES={num_microbatches} (train.num_microbatches) does not divide the "
        f"per-{shard} batch of {rows} rows (BATCH_SIZE={batch_size} over {num_shards} "
        f"{shard}{'s' if num_shards != 1 else ''})")


def loss_normalizing_factor(model, num_microbatches) -> Any:
  """The model's normaliser setting, which accumulation must repeat (M > 1 only)."""
  _check_positive(num_microbatches)
  if num_microbatches == 1:
    return None
  if not hasattr(model, "loss_normalizing_factor"):
    raise ValueError(f"NUM_MICROBATCHES={num_microbatches} needs the model's "
                     "loss_normalizing_factor ('num_tokens', a number or None) to divide "
                     f"the accumulated loss; {type(model).__name__} has none")
  return model.loss_normalizing_factor


def split_microbatches(batch, num_microbatches: int):
  """[B, ...] -> [M, B/M, ...]; microbatch m holds rows m, m + M, m + 2M, ...

  Strided rather than contiguous: the batch is sharded along `data` in contiguous
  blocks of rows, so the leading axis of a [B/M, M] reshape keeps that sharding
  and, after the swap, every microbatch takes B/(M * devices) rows from each
  device's block. No row moves between devices and every device works on every
  microbatch (contiguous slices would put a whole microbatch on a few devices).
  The constraint pins the data sharding to the second axis.
  """
  def split(x):
    x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))
  return jax.tree_util.tree_map(split, batch)


def loss_normalizer(factor, num_tokens):
  """What the model divides its summed loss by, for the whole batch."""
  if factor == "num_tokens":
    return jnp.maximum(num_tokens, 1.0)
  if factor is None:
    return jnp.float32(1.0)
  return jnp.float32(factor)


def accumulated_gradients(model, factor, trainable: Params, frozen: Params, batch,
                          dropout_rng, num_microbatches: int):
  """(loss, metric sums, gradients) of the whole batch, one microbatch at a time.

  Sums accumulate in float32 whatever the parameters' dtype; dropout draws a
  different rng per microbatch (`fold_in` of its index).
  """
  def summed_loss(trainable, microbatch, rng):
    _, metrics = model.loss_fn(merge_params(trainable, frozen), microbatch, rng)
    return metrics["loss"], metrics

  parts = split_microbatches(batch, num_microbatches)
  first = jax.tree_util.tree_map(lambda x: x[0], parts)
  metric_shapes = jax.eval_shape(summed_loss, trainable, first, dropout_rng)[1]
  zeros = lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32))
  add = lambda total, x: total + x.astype(total.dtype)

  def accumulate(sums, indexed):
    grad_sums, metric_sums = sums
    index, microbatch = indexed
    rng = jax.random.fold_in(dropout_rng, index)
    (_, metrics), grads = jax.value_and_grad(summed_loss, has_aux=True)(
        trainable, microbatch, rng)
    return (jax.tree_util.tree_map(add, grad_sums, grads),
            jax.tree_util.tree_map(add, metric_sums, metrics)), None

  sums = (jax.tree_util.tree_map(zeros, trainable), jax.tree_util.tree_map(zeros, metric_shapes))
  (grad_sums, metrics), _ = jax.lax.scan(accumulate, sums,
                                         (jnp.arange(num_microbatches), parts))
  normalizer = loss_normalizer(factor, metrics["num_tokens"])
  grads = jax.tree_util.tree_map(lambda g, p: (g / normalizer).astype(p.dtype), grad_sums,
                                 trainable)
  return metrics["loss"] / normalizer, metrics, grads
