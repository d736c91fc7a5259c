"""What a MoME vision tower returns: its tokens and its patch features laid out as an image.

MoME's adaptive deformable transformation (ADT) samples each tower's features bilinearly at
2D locations, so it needs them as a map [b, h, w, d] with a validity mask, not as a token
sequence: the ViTs' maps are their patch tokens reshaped (class and register tokens left
out, every cell valid); Pix2Struct's patches are scattered by their row and column ids into
a fixed canvas, valid where a patch landed (each image fills its own top-left rows x cols).
"""
from typing import NamedTuple, Tuple

import jax.numpy as jnp


class VisionFeatures(NamedTuple):
  """A tower's output.

  Attributes:
    tokens: [b, n, d], every token the tower outputs (transformers' `last_hidden_state`).
    feature_map: [b, h, w, d], the patch tokens on their grid.
    feature_mask: [b, h, w] bool, the cells that hold a patch.
  """
  tokens: jnp.ndarray
  feature_map: jnp.ndarray
  feature_mask: jnp.ndarray


def grid_features(tokens, num_prefix_tokens: int, grid: Tuple[int, int]) -> VisionFeatures:
  """A ViT's features: tokens [b, prefix + gh*gw, d] (patches row-major after the prefix)."""
  batch, _, width = tokens.shape
  feature_map = tokens[:, num_prefix_tokens:].reshape(batch, *grid, width)
  return VisionFeatures(tokens, feature_map, jnp.ones((batch, *grid), bool))


def scattered_features(tokens, row_ids, col_ids, canvas: Tuple[int, int]) -> VisionFeatures:
  """Pix2Struct's features: tokens [b, n, d] at 1-based row/col ids [b, n] (0: padding).

  A patch outside the canvas is dropped: `models.pix2struct_patches` refuses images whose grid
  would not fit the canvas, so only a caller bypassing it can lose one.
  """
  batch, _, width = tokens.shape
  rows, cols = canvas
  inside = (row_ids > 0) & (col_ids > 0) & (row_ids <= rows) & (col_ids <= cols)
  cell = jnp.where(inside, (row_ids - 1) * cols + (col_ids - 1), rows * cols)  # out of range
  batch_index = jnp.arange(batch)[:, None]
  feature_map = jnp.zeros((batch, rows * cols, width), tokens.dtype).at[
      batch_index, cell].set(tokens, mode="drop")
  feature_mask = jnp.zeros((batch, rows * cols), bool).at[batch_index, cell].set(
      True, mode="drop")
  return VisionFeatures(tokens, feature_map.reshape(batch, rows, cols, width),
                        feature_mask.reshape(batch, rows, cols))
