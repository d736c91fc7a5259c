"""MoME's extra vision towers inside a PaLI model: each reads the PaLI image its own way.

The PaLI input is one fixed-size image batch [b, H, W, 3] in [-1, 1] (SigLIP's pixels, what
`PaliFeatureConverter` emits). Each tower gets what its checkpoint was trained on:

* DINOv2 and CLIP: the same pixels renormalised to their checkpoints' mean and std
  (ImageNet's, CLIP's), at the PaLI resolution; their position embeddings are resized to
  that grid (bicubic, as transformers' `interpolate_pos_encoding`), so H and W need only
  be multiples of the tower's patch size.
* Pix2Struct: the patches the input pipeline cut from the unsquashed image
  (`data.pix2struct_inputs`, the batch's `flattened_patches`, `patch_row_ids`,
  `patch_col_ids`): each image at its own aspect ratio, on its own grid within
  `max_patches`. The trainer, the evaluator, `infer` and `analyze` build their pipelines
  with them (`PaliConfig.pix2struct_patching`). A caller that hands the model only the
  PaLI image gets them cut inside the model (`image_patches`, as
  `pix2struct_patches.flatten_patches`; a test holds the two equal) from that squashed
  image: one grid for the whole batch, the aspect ratio lost.

Parameters: `vision_towers/<name>/...`, each tower's own layout (`models.dinov2`,
`models.clip_vision`, `models.pix2struct_vision`), so `checkpoints.hf_vision_towers` fills
them one to one. Towers are frozen feature extractors: no adapter reaches them.
"""
import math
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_smola.models.clip_vision import ClipVision
from omni_smola.models.configs import ClipVisionConfig, DinoV2Config, Pix2StructVisionConfig
from omni_smola.models.dinov2 import DinoV2
from omni_smola.models.pix2struct_patches import FlattenedPatches, canvas_grid, patch_grid
from omni_smola.models.pix2struct_vision import Pix2StructVision
from omni_smola.models.vision_features import VisionFeatures
from omni_smola.nn import NO_ADAPTERS

# (mean, std) per RGB channel of pixels in [0, 1], as the checkpoints' image processors.
IMAGENET_PIXELS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # DINOv2
CLIP_PIXELS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def renormalise(image, pixels):
  """[b, H, W, 3] in [-1, 1] -> (x01 - mean) / std, a checkpoint's normalisation."""
  mean, std = (jnp.asarray(v, jnp.float32) for v in pixels)
  return ((image.astype(jnp.float32) + 1.0) / 2.0 - mean) / std


def image_patches(image, config: Pix2StructVisionConfig):
  """[b, H, W, C] -> (patches [b, max_patches, p*p*C], row_ids, col_ids [b, max_patches]).

  Pix2Struct's processor on a batch of one static size, in jnp (jit- and shard-friendly).
  """
  batch, height, width, channels = image.shape
  ratio = max(height, width) / min(height, width)
  if ratio > config.max_aspect_ratio:
    raise ValueError(f"images {height}x{width} have aspect ratio {ratio:.2f} above "
                     f"Pix2StructVisionConfig.max_aspect_ratio={config.max_aspect_ratio}")
  p = config.patch_size
  rows, cols = patch_grid(height, width, p, config.max_patches)
  canvas = canvas_grid(config.max_patches, config.max_aspect_ratio)
  if rows > canvas[0] or cols > canvas[1]:
    raise ValueError(f"images {height}x{width}: grid {rows}x{cols} exceeds the canvas {canvas}")
  x = image.astype(jnp.float32)
  size = height * width * channels
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  std = jnp.sqrt(jnp.sum(jnp.square(x - mean), axis=(1, 2, 3), keepdims=True) / (size - 1))
  x = (x - mean) / jnp.maximum(std, 1.0 / math.sqrt(size))
  x = jax.image.resize(x, (batch, rows * p, cols * p, channels), method="linear",
                       antialias=True)
  patches = x.reshape(batch, rows, p, cols, p, channels).transpose(0, 1, 3, 2, 4, 5)
  padding = ((0, 0), (0, config.max_patches - rows * cols))
  patches = jnp.pad(patches.reshape(batch, rows * cols, p * p * channels), padding + ((0, 0),))
  row_ids = jnp.repeat(jnp.arange(1, rows + 1, dtype=jnp.int32), cols)
  col_ids = jnp.tile(jnp.arange(1, cols + 1, dtype=jnp.int32), rows)

  def batched(ids):
    return jnp.broadcast_to(jnp.pad(ids, padding[1]), (batch, config.max_patches))
  return patches, batched(row_ids), batched(col_ids)


def host_patches(patches: FlattenedPatches, config: Pix2StructVisionConfig, name: str):
  """The batch's host-cut patches, checked against the tower that reads them."""
  batch = patches.patches.shape[0]
  for (feature, shape), array in zip(config.patching.feature_shapes().items(), patches):
    shape = (batch,) + shape
    if tuple(array.shape) != shape:
      raise ValueError(
          f"batch feature {feature!r} has shape {tuple(array.shape)}; Pix2Struct tower "
          f"{name!r} (patch_size={config.patch_size}, max_patches={config.max_patches}) "
          f"reads {shape}: the pipeline was built for another tower "
          "(PaliFeatureConverter.pix2struct_patching = PaliConfig.pix2struct_patching)")
  return tuple(patches)


# A tower's config type -> (its module, what it takes from the PaLI image).
TOWERS: Dict[type, Tuple[type, Callable[[Any, Any], tuple]]] = {
    DinoV2Config: (DinoV2, lambda image, cfg: (renormalise(image, IMAGENET_PIXELS),)),
    ClipVisionConfig: (ClipVision, lambda image, cfg: (renormalise(image, CLIP_PIXELS),)),
    Pix2StructVisionConfig: (Pix2StructVision, image_patches),
}


class VisionTowers(nn.Module):
  """Image [b, H, W, 3] in [-1, 1] -> {name: `VisionFeatures`}, one per tower.

  `patches`: the batch's host-cut `FlattenedPatches` [b, ...], which Pix2Struct towers read
  instead of cutting the PaLI image.

  Attributes:
    towers: ((name, config), ...), `PaliConfig.vision_towers`.
  """
  towers: Tuple[Tuple[str, Any], ...]
  adapters = NO_ADAPTERS  # frozen feature extractors, inside any adapted model too

  @nn.compact
  def __call__(self, image, patches: Optional[FlattenedPatches] = None
               ) -> Dict[str, VisionFeatures]:
    out = {}
    for name, config in self.towers:
      module, inputs = TOWERS[type(config)]
      if patches is not None and isinstance(config, Pix2StructVisionConfig):
        args = host_patches(patches, config, name)
      else:
        args = inputs(image, config)
      out[name] = module(config, name=name)(*args)
    return out
