"""Pix2Struct's variable-aspect-ratio patching: an image -> up to `max_patches` patches.

As transformers' `Pix2StructImageProcessor` (Lee et al. 2023, Sec. 2.2): the image is
standardised (its own mean and std, the std floored at 1/sqrt(#values)), resized so that the
largest grid of rows x cols patches with the image's aspect ratio fits the budget, cut into
patches flattened as [patch_h, patch_w, channels], and padded to `max_patches`. Row and
column ids are 1-based; 0 marks padding, which is all the tower needs as a mask.

Unlike transformers, an image too elongated for the budget is refused instead of squashed:
transformers clamps a zero row (or column) count to 1, silently changing the aspect ratio.
Images are also refused beyond `max_aspect_ratio`, which bounds the canvas the tower's
feature map is laid out on (`canvas_grid`, `models.vision_features.scattered_features`).

Runs on the host per image (numpy in, numpy out; the resize is `jax.image.resize`'s
antialiased bilinear, as transformers' torchvision resize).
"""
import math
from typing import Dict, NamedTuple, Tuple

import jax
import numpy as np


# The batch features of host-cut patches (`data.pix2struct_inputs`), in `FlattenedPatches`'
# order.
PATCH_FEATURES = ("flattened_patches", "patch_row_ids", "patch_col_ids")


class Pix2StructPatching(NamedTuple):
  """How a Pix2Struct tower cuts its images: `Pix2StructVisionConfig`'s three fields.

  What the input pipeline needs to cut the patches on the host
  (`data.pix2struct_inputs`), from the unsquashed image.
  """
  patch_size: int
  max_patches: int
  max_aspect_ratio: float

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * 3

  def feature_shapes(self) -> Dict[str, Tuple[int, ...]]:
    """{feature of `PATCH_FEATURES`: its shape in one example}."""
    return dict(zip(PATCH_FEATURES, ((self.max_patches, self.patch_dim), (self.max_patches,),
                                     (self.max_patches,))))


class FlattenedPatches(NamedTuple):
  """patches [max_patches, p*p*c] float32; row_ids, col_ids [max_patches] int32 (0: padding)."""
  patches: np.ndarray
  row_ids: np.ndarray
  col_ids: np.ndarray


def patch_grid(height: int, width: int, patch_size: int, max_patches: int) -> Tuple[int, int]:
  """(rows, cols): the most patches with the image's aspect ratio within `max_patches`."""
  scale = math.sqrt(max_patches * (patch_size / height) * (patch_size / width))
  rows = min(int(scale * height / patch_size), max_patches)
  cols = min(int(scale * width / patch_size), max_patches)
  if rows < 1 or cols < 1:
    ratio = max(height, width) / min(height, width)
    raise ValueError(f"image {height}x{width} (aspect ratio {ratio:.1f}) does not fit a patch "
                     f"budget of max_patches={max_patches}: it would get {rows} rows x "
                     f"{cols} columns of {patch_size}-pixel patches")
  return rows, cols


def canvas_grid(max_patches: int, max_aspect_ratio: float) -> Tuple[int, int]:
  """(side, side): every grid of an image within `max_aspect_ratio` fits in it.

  rows = floor(sqrt(max_patches * h / w)) <= floor(sqrt(max_patches * max_aspect_ratio)),
  and the same for columns.
  """
  side = min(max_patches, math.isqrt(math.floor(max_patches * max_aspect_ratio)))
  return side, side


def standardize(image: np.ndarray) -> np.ndarray:
  """(image - mean) / max(std, 1/sqrt(size)) over the whole image, torch's unbiased std."""
  image = np.asarray(image, np.float32)
  floor = 1.0 / math.sqrt(image.size)
  return (image - image.mean()) / max(float(image.std(ddof=1)), floor)


def flatten_patches(image: np.ndarray, *, patch_size: int, max_patches: int,
                    max_aspect_ratio: float) -> FlattenedPatches:
  """Image [H, W, C] (any value range: it is standardised) -> `FlattenedPatches`."""
  height, width, channels = image.shape
  ratio = max(height, width) / min(height, width)
  if ratio > max_aspect_ratio:
    raise ValueError(f"image {height}x{width} has aspect ratio {ratio:.2f} above "
                     f"max_aspect_ratio={max_aspect_ratio} (Pix2StructVisionConfig)")
  rows, cols = patch_grid(height, width, patch_size, max_patches)
  canvas = canvas_grid(max_patches, max_aspect_ratio)
  if rows > canvas[0] or cols > canvas[1]:  # float rounding at the bound
    raise ValueError(f"image {height}x{width}: grid {rows}x{cols} exceeds the canvas {canvas}")
  image = standardize(image)
  resized = np.asarray(jax.image.resize(image, (rows * patch_size, cols * patch_size, channels),
                                        method="linear", antialias=True))
  patches = resized.reshape(rows, patch_size, cols, patch_size, channels).transpose(0, 2, 1, 3, 4)
  patches = patches.reshape(rows * cols, patch_size * patch_size * channels)
  padding = max_patches - rows * cols
  row_ids = np.repeat(np.arange(1, rows + 1, dtype=np.int32), cols)
  col_ids = np.tile(np.arange(1, cols + 1, dtype=np.int32), rows)
  return FlattenedPatches(np.pad(patches, ((0, padding), (0, 0))),
                          np.pad(row_ids, (0, padding)), np.pad(col_ids, (0, padding)))
