"""The PaLI feature converter: task features -> the features the model consumes.

Task features (see `registration.vl_output_features`):
  inputs      int32 [<=L_in]   prompt tokens, EOS-terminated
  targets     int32 [<=L_out]  answer/caption tokens, EOS-terminated
  image       string [1]       the encoded image (decoded here; or uint8 [h, w, 3] pixels)
  task_id     int32 [1]        stable per task
  example_id  string [1]       names the example if its image cannot be decoded
(The rank-1 wrappers are there because seqio's Evaluator measures every output feature
along axis 0.)

Model features:
  image                  float32 [H, W, 3] in [-1, 1], H, W = `image_size`
  encoder_input_tokens   int32 [L_in]
  decoder_input_tokens   int32 [L_out]   targets shifted right, 0 as BOS (T5 convention)
  decoder_target_tokens  int32 [L_out]
  decoder_loss_weights   int32 [L_out]   1 on target tokens, 0 on padding
  task_id                int32 []
and, with `pix2struct_patching` (a model with a Pix2Struct tower), that tower's patches cut
from the unsquashed image (`pix2struct_inputs`, variable aspect ratio):
  flattened_patches      float32 [max_patches, p*p*3]
  patch_row_ids, patch_col_ids  int32 [max_patches]   1-based, 0 marks padding

Sequences are truncated and padded to TASK_FEATURE_LENGTHS = {"inputs": L_in,
"targets": L_out}; examples are never packed (one image per example). Everything else
(`*_pretokenized`, `answers`, ids) is dropped.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import gin
import seqio
import tensorflow as tf

from omni_smola.data import images
from omni_smola.data import pix2struct_inputs
from omni_smola.models.pix2struct_patches import Pix2StructPatching

_Spec = seqio.FeatureConverter.FeatureSpec
TEXT_FEATURES = ("inputs", "targets")


@gin.configurable(module="omni_smola.data")
class PaliFeatureConverter(seqio.FeatureConverter):
  """Converts image+text task examples into PaLI encoder-decoder model features.

  Args:
    image_size: the PaLI image's (H, W), or one side.
    pix2struct_patching: `PaliConfig.pix2struct_patching` of a model with a Pix2Struct
      tower: adds its patches, cut from the image before it is squashed.
  """

  TASK_FEATURES = {"inputs": _Spec(dtype=tf.int32), "targets": _Spec(dtype=tf.int32)}
  MODEL_FEATURES = {
      "image": _Spec(dtype=tf.float32, rank=3),
      "encoder_input_tokens": _Spec(dtype=tf.int32),
      "decoder_input_tokens": _Spec(dtype=tf.int32),
      "decoder_target_tokens": _Spec(dtype=tf.int32),
      "decoder_loss_weights": _Spec(dtype=tf.int32),
      "task_id": _Spec(dtype=tf.int32, rank=0),
  }
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, image_size: Union[int, Sequence[int]] = 224,
               pix2struct_patching: Optional[Pix2StructPatching] = None, pack: bool = False,
               **kwargs):
    if pack:
      raise ValueError("PaliFeatureConverter does not pack: each example has its own image.")
    if isinstance(image_size, int):
      image_size = (image_size, image_size)
    self.image_size = tuple(int(s) for s in image_size)
    self.pix2struct_patching = pix2struct_patching
    if pix2struct_patching is not None:
      self.MODEL_FEATURES = {  # pylint: disable=invalid-name
          **self.MODEL_FEATURES,
          **{name: _Spec(dtype=pix2struct_inputs.FEATURE_DTYPES[name], rank=len(shape))
             for name, shape in pix2struct_patching.feature_shapes().items()}}
    super().__init__(pack=False, **kwargs)

  def __call__(self, ds: tf.data.Dataset,
               task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    # seqio's Evaluator passes a length for every output feature of the task, image and
    # task_id included; only the token features have lengths to honour.
    lengths = {k: v for k, v in task_feature_lengths.items() if k in TEXT_FEATURES}
    # Tasks trim already (and append EOS after trimming); this is the converter's one trim,
    # for datasets read without sequence lengths, before seqio's "length <= limit" check.
    ds = ds.map(lambda ex: {k: v[:lengths[k]] if k in lengths else v for k, v in ex.items()},
                num_parallel_calls=tf.data.AUTOTUNE)
    return super().__call__(ds, lengths)

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    spec = ds.element_spec
    for feature in ("image", "task_id"):
      if feature not in spec:
        raise ValueError(f"PaliFeatureConverter needs a `{feature}` feature; got "
                         f"{sorted(spec)}. Register tasks with register_vl_task.")
    encoded = spec["image"].dtype == tf.string and spec["image"].shape.rank == 1
    decoded = spec["image"].dtype == tf.uint8 and spec["image"].shape.rank == 3
    if not (encoded or decoded):
      raise ValueError(f"`image` must be encoded bytes (tf.string [1]) or decoded pixels "
                       f"(tf.uint8 [h, w, 3]); got {spec['image']}.")
    if spec["task_id"].dtype != tf.int32:
      raise ValueError(f"`task_id` must be int32, got {spec['task_id'].dtype.name}.")
    image_size = self.image_size
    patching = self.pix2struct_patching
    bos_id = self._bos_id

    def to_model_features(example):
      task_id = tf.reshape(example["task_id"], [-1])[0]
      image = example["image"]
      description = (example["example_id"][0] if "example_id" in example
                     else tf.constant("unnamed"))
      if encoded:
        image = images.decode_image(image[0], description, task_id)
      inputs = _pad(example["inputs"], task_feature_lengths["inputs"])
      targets = _pad(example["targets"], task_feature_lengths["targets"])
      patches = ({} if patching is None else
                 pix2struct_inputs.flatten_patches(image, patching, description))
      return {
          **patches,
          "image": images.resize_and_normalize(image, image_size),
          "encoder_input_tokens": inputs,
          "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(
              targets, bos_id=bos_id),
          "decoder_target_tokens": targets,
          "decoder_loss_weights": seqio.feature_converters.non_padding_position(targets),
          "task_id": task_id,
      }

    return ds.map(to_model_features, num_parallel_calls=tf.data.AUTOTUNE)

  def model_feature_shapes(self, task_feature_lengths: Mapping[str, int]
                           ) -> Dict[str, Tuple[int, ...]]:
    """Each model feature's shape in one example (the memory plan's batch)."""
    shapes = {
        "image": self.image_size + (3,),
        "encoder_input_tokens": (task_feature_lengths["inputs"],),
        "decoder_input_tokens": (task_feature_lengths["targets"],),
        "decoder_target_tokens": (task_feature_lengths["targets"],),
        "decoder_loss_weights": (task_feature_lengths["targets"],),
        "task_id": (),
    }
    if self.pix2struct_patching is not None:
      shapes.update(self.pix2struct_patching.feature_shapes())
    return shapes

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> Mapping[str, int]:
    """Each feature's length along its first axis; rank 0 (`task_id`) gives 1, whose
    length check seqio skips."""
    return {name: shape[0] if shape else 1
            for name, shape in self.model_feature_shapes(task_feature_lengths).items()}


def _pad(tokens: tf.Tensor, length: int) -> tf.Tensor:
  """`tokens` (at most `length`: trimmed in `__call__`) zero-padded to `length`."""
  tokens = tf.pad(tokens, [[0, length - tf.shape(tokens)[0]]])
  tokens.set_shape([length])
  return tokens
