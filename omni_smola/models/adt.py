"""MoME's Adaptive Deformable Transformation (ADT): one tower's feature map -> L tokens.

A tower's feature map `f: [b, h, w, d]` (its patch tokens on their grid) becomes
`L` tokens at a common width, whatever the tower's grid and width, so MoVE can sum
the towers (`models.move`):

    queries = AdaptiveAvgPool(f) to a sqrt(L) x sqrt(L) grid, + a learned position
    M times:  q += SelfAttention(LN q);  q += DeformableCrossAttention(LN q, R, f);
              q += MLP(LN q)
    out     = Dense(LN q)                                 [b, L, out_features]

M (6), Nh (8), Np (4) are the paper's; L, the pre-LayerNorm order, the query
position embedding and the MLP width (4 d) are ours (docs/DESIGN.md §3.7). The
layers run at the tower's width `d`; `R` are learnable reference points, one per
query, initialised at the centres of the query grid's cells.

`AveragePool` is the paper's ablation: the pooled queries straight to the output
projection, no layers.

A validity mask `[b, h, w]` (Pix2Struct's padded variable grid, valid region in the
top-left) makes the pooling bins cover each example's own valid region and the
deformable sampling read zero on padding.
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from omni_smola.models.attention import MultiHeadAttention
from omni_smola.models.configs import ADTConfig
from omni_smola.models.vit import MlpBlock, layer_norm
from omni_smola.nn import NO_ADAPTERS, TokenContext
from omni_smola.nn.deformable_attention import (DeformableCrossAttention, check_valid_mask,
                                                valid_extent)
from omni_smola.nn.stored_param import stored_param


def _bin_membership(extent, size: int, bins: int):
  """[b, bins, size] 1.0 where pixel falls in the bin (PyTorch's adaptive-pool bins).

  Bin i covers [floor(i E / bins), ceil((i + 1) E / bins)) of each example's valid
  extent E, so bins overlap when E is not a multiple of `bins`, as adaptive pooling.
  """
  extent = extent.astype(jnp.int32)[:, None, None]  # [b, 1, 1]
  index = jnp.arange(bins)[None, :, None]
  start = (index * extent) // bins
  end = -((-(index + 1) * extent) // bins)
  pixel = jnp.arange(size)[None, None, :]
  return ((pixel >= start) & (pixel < end)).astype(jnp.float32)


def adaptive_average_pool(features, side: int, valid=None):
  """[b, h, w, d] -> [b, side*side, d]: means over each bin of the valid region."""
  check_valid_mask(valid, features, "adaptive_average_pool")
  batch, height, width, _ = features.shape
  extent = valid_extent(valid, height, width, batch)
  rows = _bin_membership(extent[:, 0], height, side)  # [b, i, h]
  cols = _bin_membership(extent[:, 1], width, side)  # [b, j, w]
  weight = jnp.ones((batch, height, width)) if valid is None else valid.astype(jnp.float32)
  total = jnp.einsum("bih,bjw,bhwd->bijd", rows, cols,
                     features.astype(jnp.float32) * weight[..., None])
  count = jnp.einsum("bih,bjw,bhw->bij", rows, cols, weight)
  pooled = total / jnp.maximum(count, 1.0)[..., None]
  return pooled.reshape(batch, side * side, -1).astype(features.dtype)


def _grid_centres(side: int):
  """[side*side, 2] (row, col) centres of a side x side grid over [0, 1]^2."""
  centres = (jnp.arange(side, dtype=jnp.float32) + 0.5) / side
  rows, cols = jnp.meshgrid(centres, centres, indexing="ij")
  return jnp.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)


def _output_projection(out_features: int, dtype):
  # Both widths are `embed`; the input side stays unsharded (as PaLI's img_projection).
  return nn.Dense(out_features, dtype=dtype, name="output_projection",
                  kernel_init=nn.with_logical_partitioning(
                      nn.initializers.lecun_normal(), (None, "embed")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class ADTLayer(nn.Module):
  """Self-attention over the queries, deformable cross-attention into f, MLP."""
  config: ADTConfig

  @nn.compact
  def __call__(self, queries, reference_points, features, valid):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    width = queries.shape[-1]
    context = TokenContext()
    y = layer_norm("LayerNorm_0", dtype)(queries)
    queries = queries + MultiHeadAttention(
        cfg.num_heads, width // cfg.num_heads, init_style="vit", dtype=dtype,
        name="self_attention")(y, y, context, context)
    y = layer_norm("LayerNorm_1", dtype)(queries)
    queries = queries + DeformableCrossAttention(
        cfg.num_heads, cfg.num_points, dtype=dtype, name="cross_attention")(
            y, reference_points, features, valid)
    y = layer_norm("LayerNorm_2", dtype)(queries)
    return queries + MlpBlock(cfg.mlp_ratio * width, dtype=dtype, name="mlp")(y, context)


class ADT(nn.Module):
  """[b, h, w, d] feature map (+ [b, h, w] validity) -> [b, L, out_features]."""
  config: ADTConfig
  out_features: int

  @property
  def adapters(self):
    return NO_ADAPTERS  # trained in full: no projection here carries an adapter

  @nn.compact
  def __call__(self, features, valid: Optional[Any] = None):
    cfg = self.config
    _, height, width, feature_width = features.shape
    side = cfg.check_feature_grid(height, width, self.name or "ADT")
    if feature_width % cfg.num_heads:
      raise ValueError(f"ADTConfig.num_heads={cfg.num_heads} does not divide {self.name}'s "
                       f"width {feature_width}")
    queries = adaptive_average_pool(features, side, valid)
    queries = queries + stored_param(
        self, "query_position", nn.with_logical_partitioning(
            nn.initializers.normal(stddev=feature_width ** -0.5), ("length", "embed")),
        (cfg.num_queries, feature_width))
    reference_points = stored_param(
        self, "reference_points", nn.with_logical_partitioning(
            lambda *_: _grid_centres(side), ("length", None)), (cfg.num_queries, 2))
    queries = nn.with_logical_constraint(queries, ("batch", "length", "embed"))
    for i in range(cfg.num_layers):
      queries = ADTLayer(cfg, name=f"layers_{i}")(queries, reference_points, features, valid)
      queries = nn.with_logical_constraint(queries, ("batch", "length", "embed"))
    queries = layer_norm("final_norm", jnp.dtype(cfg.dtype))(queries)
    return _output_projection(self.out_features, jnp.dtype(cfg.dtype))(queries)


class AveragePool(nn.Module):
  """The ablation's transformation: adaptive average pooling, then the output projection."""
  config: ADTConfig
  out_features: int

  @nn.compact
  def __call__(self, features, valid: Optional[Any] = None):
    height, width = features.shape[1:3]
    side = self.config.check_feature_grid(height, width, self.name or "AveragePool")
    queries = adaptive_average_pool(features, side, valid)
    return _output_projection(self.out_features, jnp.dtype(self.config.dtype))(queries)
