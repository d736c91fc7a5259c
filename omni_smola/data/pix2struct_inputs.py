"""Pix2Struct's patches cut in the input pipeline from the unsquashed image.

The PaLI image is squashed to one static size (`images.resize_and_normalize`): that is what
the ViT, DINOv2 and CLIP read. Pix2Struct reads an image at its own aspect ratio (Lee et al.
2023, Sec. 2.2), so `PaliFeatureConverter` cuts its patches here, from the decoded image
before any resize, as TensorFlow ops (tf.data runs them in parallel, and they checkpoint with
the iterator), into three more model features:

  flattened_patches  float32 [max_patches, p*p*3]   zero-padded
  patch_row_ids      int32 [max_patches]            1-based; 0 marks padding
  patch_col_ids      int32 [max_patches]

They are `models.pix2struct_patches.flatten_patches` (transformers' processor, in numpy)
written in TensorFlow; a test holds the two equal. An image beyond the tower's
`max_aspect_ratio` stops the input, naming the example, instead of being squashed.
"""
from __future__ import annotations

import tensorflow as tf

from omni_smola.models.pix2struct_patches import PATCH_FEATURES, Pix2StructPatching

FEATURE_DTYPES = dict(zip(PATCH_FEATURES, (tf.float32, tf.int32, tf.int32)))


def flatten_patches(image: tf.Tensor, patching: Pix2StructPatching,
                    description: tf.Tensor) -> dict[str, tf.Tensor]:
  """uint8 [h, w, 3], unsquashed -> {feature: tensor} of `PATCH_FEATURES`.

  Args:
    image: the decoded image.
    patching: the model's Pix2Struct cut (`PaliConfig.pix2struct_patching`).
    description: names the example in the error of an image too elongated.
  """
  p, budget = patching.patch_size, patching.max_patches
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
  ratio = tf.maximum(height, width) / tf.minimum(height, width)
  within = tf.debugging.Assert(
      ratio <= patching.max_aspect_ratio,
      ["Pix2Struct patches: the image of example (", description, ") is", shape[0], "x",
       shape[1], "pixels, aspect ratio", ratio, "above the tower's "
       f"Pix2StructVisionConfig.max_aspect_ratio={patching.max_aspect_ratio}"], summarize=8)
  with tf.control_dependencies([within]):
    # The numpy version's arithmetic, in its order and in float64: the same grid.
    scale = tf.sqrt(budget * (p / height) * (p / width))
    rows = tf.minimum(tf.cast(tf.floor(scale * height / p), tf.int32), budget)
    cols = tf.minimum(tf.cast(tf.floor(scale * width / p), tf.int32), budget)
  pixels = tf.cast(image, tf.float32)
  count = tf.cast(tf.size(pixels), tf.float32)
  mean = tf.reduce_mean(pixels)
  std = tf.sqrt(tf.reduce_sum(tf.square(pixels - mean)) / (count - 1.0))
  pixels = (pixels - mean) / tf.maximum(std, tf.math.rsqrt(count))
  resized = tf.image.resize(pixels, tf.stack([rows * p, cols * p]), method="bilinear",
                            antialias=True)
  patches = tf.transpose(tf.reshape(resized, [rows, p, cols, p, 3]), [0, 2, 1, 3, 4])
  patches = tf.reshape(patches, [rows * cols, patching.patch_dim])
  padding = budget - rows * cols
  features = {
      "flattened_patches": tf.pad(patches, [[0, padding], [0, 0]]),
      "patch_row_ids": tf.pad(tf.repeat(tf.range(1, rows + 1), cols), [[0, padding]]),
      "patch_col_ids": tf.pad(tf.tile(tf.range(1, cols + 1), [rows]), [[0, padding]]),
  }
  for name, shape in patching.feature_shapes().items():
    features[name].set_shape(shape)
  return features
