"""Deformable cross-attention (MoME's ADT; Zhu et al.'s Deformable DETR, one level).

Each query looks at a few learned points of a feature map instead of all of it:
for query q, head n and point p the sampling location is `R_q + Delta_qnp`, where
`R: [L, 2]` are learnable reference points and `Delta = P_offset(query)`; the head
output is `sum_p w_qnp * bilinear(P_value(f)_n, location_qnp)` with
`w = softmax_p(P_weight(query))`, and `P_out` joins the heads.

Bilinear sampling is written as one gather of the four corner pixels plus
explicit interpolation weights (`bilinear_sample`), not `jax.image` or
`map_coordinates`: the gather runs per head along the unsharded pixel axis, so it
shards like the rest of attention (batch on `data`, heads on `model`), and the
gradient reaches both the values (through the gather) and the locations (through
the weights).

Coordinates are `(row, col)`, normalised to the map's *valid extent*: 0 and 1 are
its outer edges and pixel `i` of `n` has its centre at `(i + 0.5) / n` (as
`grid_sample(align_corners=False)`). A corner outside the array, or on a pixel the
validity mask marks as padding (Pix2Struct's variable grid, padded on the bottom
and right), reads zero. Offsets are in pixels of that extent (Deformable DETR's
normalisation), so a unit offset moves one pixel whatever the image's shape.

Letters: b batch, q query, n head, p point, k corner (4), c channels per head,
h, w the map's rows and columns, z a (row, col) coordinate, d widths.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_smola.nn.stored_param import stored_param

# The four bilinear corners as (row, col) steps from the floor pixel.
_CORNERS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)


def valid_extent(valid: Optional[jnp.ndarray], height: int, width: int,
                 batch: int) -> jnp.ndarray:
  """[b, 2] float32 (rows, cols) of each example's valid region.

  The region is the top-left rectangle the mask covers (a padded Pix2Struct grid):
  the number of rows and of columns holding any valid pixel (at least one, so an
  all-padding example reads zeros instead of dividing by zero). No mask: the array.
  """
  if valid is None:
    return jnp.broadcast_to(jnp.array([height, width], jnp.float32), (batch, 2))
  rows = jnp.sum(jnp.any(valid, axis=2), axis=1)
  cols = jnp.sum(jnp.any(valid, axis=1), axis=1)
  return jnp.maximum(jnp.stack([rows, cols], axis=-1), 1).astype(jnp.float32)


def check_valid_mask(valid, features, where: str) -> None:
  """Fails, naming the shapes, when a validity mask does not match the feature map."""
  if valid is not None and tuple(valid.shape) != tuple(features.shape[:3]):
    batch, height, width = features.shape[:3]
    raise ValueError(f"{where}: the validity mask has shape {tuple(valid.shape)}, the "
                     f"features are [batch={batch}, h={height}, w={width}, d]")


def bilinear_sample(values, locations, extent, valid=None):
  """Samples `values` at `locations`; outside the array or on padding reads zero.

  Args:
    values: [b, h, w, n, c] per-head feature maps.
    locations: [b, q, n, p, 2] (row, col), normalised to `extent` (module docstring).
    extent: [b, 2] rows and columns of each example's valid region (`valid_extent`).
    valid: [b, h, w] bool, False on padding; None: every pixel is valid.
  Returns:
    [b, q, n, p, c].
  """
  batch, height, width, heads, channels = values.shape
  if valid is not None:
    values = values * valid[..., None, None].astype(values.dtype)
  pixel = locations.astype(jnp.float32) * extent[:, None, None, None, :] - 0.5
  floor = jnp.floor(pixel)
  fraction = pixel - floor  # [b, q, n, p, 2]
  corners = floor[..., None, :] + _CORNERS  # [b, q, n, p, k, 2]
  # Each corner's weight is the product over (row, col) of frac or 1 - frac.
  corner_weights = jnp.prod(jnp.where(_CORNERS == 1, fraction[..., None, :],
                                      1.0 - fraction[..., None, :]), axis=-1)
  inside = ((corners >= 0) & (corners < jnp.array([height, width], jnp.float32)))
  corner_weights = corner_weights * jnp.all(inside, axis=-1)  # [b, q, n, p, k]
  rows = jnp.clip(corners[..., 0], 0, height - 1).astype(jnp.int32)
  cols = jnp.clip(corners[..., 1], 0, width - 1).astype(jnp.int32)
  flat_index = rows * width + cols  # [b, q, n, p, k]

  queries, points = locations.shape[1], locations.shape[3]
  per_head = values.reshape(batch, height * width, heads, channels).transpose(0, 2, 1, 3)
  index = flat_index.transpose(0, 2, 1, 3, 4).reshape(batch, heads, -1)  # [b, n, q*p*k]
  gathered = jnp.take_along_axis(per_head, index[..., None], axis=2)  # [b, n, q*p*k, c]
  gathered = gathered.reshape(batch, heads, queries, points, 4, channels)
  return jnp.einsum("bnqpkc,bqnpk->bqnpc", gathered,
                    corner_weights.astype(values.dtype))


def _ring_offsets(heads: int, points: int) -> np.ndarray:
  """[n, p, 2] initial offsets: head n looks along its own direction, point p at p+1 pixels.

  Deformable DETR's initialisation: with the offset kernel at zero, the heads start
  spread around the reference point instead of all sampling it.
  """
  angles = 2 * math.pi * np.arange(heads) / heads
  directions = np.stack([np.sin(angles), np.cos(angles)], axis=-1)  # (row, col)
  directions = directions / np.max(np.abs(directions), axis=-1, keepdims=True)
  return (directions[:, None, :] * np.arange(1, points + 1)[None, :, None]).astype(np.float32)


class DeformableCrossAttention(nn.Module):
  """Queries [b, q, d_q] attend to a feature map [b, h, w, d] at learned points.

  Attributes:
    num_heads: Nh (MoME: 8); must divide the feature width.
    num_points: Np sampling points per head (MoME: 4).
  """
  num_heads: int = 8
  num_points: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, reference_points, features, valid=None):
    """queries [b, q, d_q]; reference_points [q, 2] in [0, 1]; features [b, h, w, d].

    Returns [b, q, d_q]. `valid` [b, h, w] bool marks the real pixels (None: all).
    """
    batch, height, width, feature_width = features.shape
    query_width = queries.shape[-1]
    if feature_width % self.num_heads:
      raise ValueError(f"DeformableCrossAttention.num_heads={self.num_heads} does not "
                       f"divide the feature width {feature_width}")
    check_valid_mask(valid, features, "DeformableCrossAttention")
    heads, points = self.num_heads, self.num_points
    head_dim = feature_width // heads

    def projection(name, kernel_shape, kernel_axes, kernel_init, bias_shape, bias_init):
      kernel = stored_param(self, f"{name}_kernel", nn.with_logical_partitioning(
          kernel_init, kernel_axes), kernel_shape, jnp.float32)
      bias = stored_param(self, f"{name}_bias", nn.with_logical_partitioning(
          bias_init, kernel_axes[-len(bias_shape):]), bias_shape, jnp.float32)
      return jnp.asarray(kernel, self.dtype), jnp.asarray(bias, self.dtype)

    def xavier(fan_in_axes, fan_out_axes):
      return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=fan_in_axes,
                                              out_axis=fan_out_axes)

    value_kernel, value_bias = projection(
        "value", (feature_width, heads, head_dim), ("embed", "heads", "kv"),
        xavier(0, (1, 2)), (heads, head_dim), nn.initializers.zeros)
    values = jnp.einsum("bhwd,dnc->bhwnc", features.astype(self.dtype), value_kernel)
    values = nn.with_logical_constraint(values + value_bias,
                                        ("batch", None, None, "heads", "kv"))
    ring = _ring_offsets(heads, points)
    offset_kernel, offset_bias = projection(
        "offset", (query_width, heads, points, 2), ("embed", "heads", None, None),
        nn.initializers.zeros, (heads, points, 2), lambda *_: jnp.asarray(ring))
    offsets = jnp.einsum("bqd,dnpz->bqnpz", queries.astype(self.dtype), offset_kernel)
    offsets = offsets + offset_bias  # z: (row, col)
    weight_kernel, weight_bias = projection(
        "weight", (query_width, heads, points), ("embed", "heads", None),
        nn.initializers.zeros, (heads, points), nn.initializers.zeros)
    logits = jnp.einsum("bqd,dnp->bqnp", queries.astype(self.dtype), weight_kernel)
    logits = logits + weight_bias
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [b, q, n, p]

    extent = valid_extent(valid, height, width, batch)
    locations = (jnp.broadcast_to(reference_points, queries.shape[:2] + (2,))[:, :, None, None]
                 + offsets.astype(jnp.float32) / extent[:, None, None, None, :])
    sampled = bilinear_sample(values, locations, extent, valid)  # [b, q, n, p, c]
    mixed = jnp.einsum("bqnpc,bqnp->bqnc", sampled, weights.astype(sampled.dtype))
    mixed = nn.with_logical_constraint(mixed, ("batch", "length", "heads", "kv"))
    out_kernel, out_bias = projection(
        "out", (heads, head_dim, query_width), ("heads", "kv", "embed"),
        xavier((0, 1), 2), (query_width,), nn.initializers.zeros)
    return jnp.einsum("bqnc,ncd->bqd", mixed, out_kernel) + out_bias
