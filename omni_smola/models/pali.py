"""PaLI-like model: image -> ViT -> projection -> [visual; prompt] -> T5 encoder -> decoder.

Parameters: `img/...` (the ViT, `omni_smola.models.vit`), `img_projection/{kernel,
bias}` (ViT width -> text width) and `text/...` (the encoder-decoder in T5X's
layout, `omni_smola.models.t5`), so a SigLIP checkpoint fills `img` and a T5X / UL2
checkpoint fills `text` one to one.

The encoder sees `[visual tokens; prompt tokens]` with a static layout hint
(`TokenContext.num_visual_tokens`), so Omni-SMoLA's modality groups slice the
sequence instead of masking it; the decoder's instance-level adapters route on
the mean encoder output over valid tokens (`EncoderOutput.instance_features`).

MoME (`PaliConfig.move`): the ViT is one of several towers (`'img'`, beside
`vision_towers/<name>/...`, `models.vision_towers`); MoVE (`move/...`, `models.move`)
turns their feature maps into the visual tokens, weighed per example by a router on
the instruction embedding (`EncoderDecoder.instruction`: the prompt alone, never the
image or the targets), and those go through `img_projection` as the ViT's tokens do.
Without `move` the model is exactly the single-ViT PaLI above: same modules, same paths.

Named intermediates (flax `intermediates` collection, only when it is mutable):
`img_tokens` (projected patch tokens), `tower_weights` ([b, towers], MoME only),
`text/encoded`, `text/decoder/pre_logits`.
"""
from typing import Optional

import flax.linen as nn

from omni_smola.models.configs import PALI_VIT_TOWER, PaliConfig
from omni_smola.models.layers import BiasedAdaptedDense
from omni_smola.models.move import MoVE
from omni_smola.models.t5 import EncoderDecoder, EncoderOutput
from omni_smola.models.vision_features import grid_features
from omni_smola.models.vision_towers import VisionTowers
from omni_smola.models.vit import ViT
from omni_smola.nn import NO_ADAPTERS, AdapterPlan


class Pali(nn.Module):
  """The PaLI model; `adapters` is the plan every projection reads (`AdaptedDense.plan`)."""
  config: PaliConfig
  adapters: Optional[AdapterPlan] = None

  def setup(self):
    if self.config.vision is None:
      raise ValueError("Pali needs a vision config; use t5.EncoderDecoder for text only")
    self.img = ViT(self.config.vision)
    if self.config.move is not None:
      self.vision_towers = VisionTowers(self.config.vision_towers)
      self.move = MoVE(self.config.move)
    # The two widths are both `embed`; the input side stays unsharded so an
    # `embed` rule never names one mesh axis twice.
    self.img_projection = BiasedAdaptedDense(
        features=self.config.text.emb_dim, kernel_axes=(None, "embed"),
        adapters=NO_ADAPTERS, dtype=self.config.text.activation_dtype)
    self.text = EncoderDecoder(self.config.text)

  def encode(self, image, encoder_input_tokens, *, task_ids=None, patches=None,
             enable_dropout: bool = False) -> EncoderOutput:
    """Image [b, H, W, 3] in [-1, 1], prompt tokens [b, L_in] (0 = padding), task ids [b];
    `patches`: the host-cut `FlattenedPatches` a Pix2Struct tower reads (MoME)."""
    if self.config.move is None:
      visual = self.img(image, enable_dropout)
    else:
      visual = self.mixture_of_vision_experts(image, encoder_input_tokens, enable_dropout,
                                              patches)
    img_tokens = self.img_projection(visual)
    self.sow("intermediates", "img_tokens", img_tokens)
    return self.text.encode(encoder_input_tokens, img_tokens, task_ids=task_ids,
                            enable_dropout=enable_dropout)

  def mixture_of_vision_experts(self, image, encoder_input_tokens, enable_dropout: bool,
                                patches=None):
    """MoVE's fused tokens [b, L, move.width] from every tower and the prompt."""
    vit = self.config.vision
    features = dict(self.vision_towers(image, patches))
    grid = (image.shape[1] // vit.patch_size, image.shape[2] // vit.patch_size)
    features[PALI_VIT_TOWER] = grid_features(self.img(image, enable_dropout), 0, grid)
    towers = [features[name] for name in self.config.move.tower_names]
    fused, aux = self.move([t.feature_map for t in towers],
                           self.text.instruction(encoder_input_tokens),
                           [t.feature_mask for t in towers])
    self.sow("intermediates", "tower_weights", aux["tower_weights"])
    return fused

  def decode(self, encoder_output: EncoderOutput, decoder_input_tokens, *,
             enable_dropout: bool = False, decode: bool = False,
             max_decode_length: Optional[int] = None, decoder_target_tokens=None):
    """Logits [b, L_out, vocab] (float32); see `t5.Decoder` for `decode`."""
    return self.text.decode(encoder_output, decoder_input_tokens,
                            enable_dropout=enable_dropout, decode=decode,
                            max_decode_length=max_decode_length,
                            decoder_target_tokens=decoder_target_tokens)

  def __call__(self, image, encoder_input_tokens, decoder_input_tokens, *, task_ids=None,
               patches=None, enable_dropout: bool = False, decoder_target_tokens=None):
    encoder_output = self.encode(image, encoder_input_tokens, task_ids=task_ids,
                                 patches=patches, enable_dropout=enable_dropout)
    return self.decode(encoder_output, decoder_input_tokens, enable_dropout=enable_dropout,
                       decoder_target_tokens=decoder_target_tokens)
