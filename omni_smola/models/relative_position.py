"""T5's relative position biases: log-spaced distance buckets, one learned table per stack.

The bucket of a (query, key) pair depends only on `key - query`: exact buckets
for short distances, log-spaced ones up to `max_distance`, one shared bucket
beyond. Bidirectional stacks (the encoder) spend half the buckets on keys after
the query; causal stacks (the decoder) only see keys at or before it.

Buckets are computed with numpy at trace time (the shapes are static), in
float32 with the same operation order as `transformers`' T5, so that bucket
boundaries (e.g. distance 16, where the log ratio is an exact integer) fall on
the same side in both: a checkpoint then gives bit-identical biases.

Decoding one position at a time slices the row of the full `[length, length]`
table at the cache index, so cached and recomputed decoding use the very same
buckets.
"""
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_smola.nn.stored_param import stored_param


def relative_position_buckets(query_length: int, key_length: int, bidirectional: bool,
                              num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
  """[query_length, key_length] int32 bucket ids for queries/keys at positions 0, 1, ..."""
  relative = (np.arange(key_length, dtype=np.int64)[None, :]
              - np.arange(query_length, dtype=np.int64)[:, None])
  buckets = np.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative)
  else:
    distance = -np.minimum(relative, 0)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):  # log(0) is never selected: 0 < max_exact
    log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
  scaled = (log_ratio / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact))
  large = max_exact + np.nan_to_num(scaled, neginf=0.0).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  buckets += np.where(distance < max_exact, distance, large)
  return buckets.astype(np.int32)


class RelativePositionBias(nn.Module):
  """The `[heads, buckets]` table `rel_embedding` and the attention bias it gives."""
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128

  @nn.compact
  def __call__(self, query_length: int, key_length: int, bidirectional: bool,
               query_position: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Bias [1, heads, query_length, key_length], float32.

    query_position: for single-position decoding (query_length 1), the query's
      position among keys 0..key_length-1 (a traced scalar).
    """
    table = stored_param(
        self, "rel_embedding",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
            ("heads", "relpos_buckets")),
        (self.num_heads, self.num_buckets), jnp.float32)
    if query_position is None:
      buckets = jnp.asarray(relative_position_buckets(
          query_length, key_length, bidirectional, self.num_buckets, self.max_distance))
    else:
      all_rows = jnp.asarray(relative_position_buckets(
          key_length, key_length, bidirectional, self.num_buckets, self.max_distance))
      buckets = jax.lax.dynamic_slice_in_dim(all_rows, query_position, 1, axis=0)
    return jnp.take(table, buckets, axis=1)[None]  # [1, h, q, k]
