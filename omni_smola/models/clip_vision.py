"""CLIP ViT image encoder (Radford et al. 2021): MoME's stand-in for EVA-CLIP.

MoME uses EVA-CLIP ViT-G/14 with its last layer dropped; transformers ships no EVA-CLIP, so
this is the OpenAI CLIP architecture as transformers' `CLIPVisionModel` computes it: patch
convolution without bias, class token, patch position embeddings resized with torch's
bicubic for other resolutions (`interpolate_pos_encoding=True`), a LayerNorm before the
first block (`pre_layrnorm`), pre-norm blocks with quick-GELU MLPs, LayerNorm eps 1e-5. The
tokens leave the last block un-normalised (`last_hidden_state`); CLIP's `post_layernorm`
only normalises the pooled class token for the contrastive head, which this tower omits.
Dropping layers, as MoME does, is `depth` below the checkpoint's (the importer drops them).

Parameters (`{i}` a block; the block's own in `models.vit_blocks`):
    embedding/{kernel [p, p, 3, d], bias [d]}   (the bias is zero for CLIP checkpoints)
    cls [1, 1, d]   pos_embedding [1, 1 + grid**2, d]
    pre_norm/{scale, bias}
    Transformer/encoderblock_{i}/...
"""
import flax.linen as nn

from omni_smola.models.configs import ClipVisionConfig
from omni_smola.models.vision_features import VisionFeatures, grid_features
from omni_smola.models.vit import layer_norm
from omni_smola.models.vit_blocks import Transformer, embed_with_class_token
from omni_smola.nn import NO_ADAPTERS


class ClipVision(nn.Module):
  """Image [b, H, W, 3] (CLIP's normalisation) -> `VisionFeatures`.

  tokens [b, 1 + gh*gw, d] (class token first); feature_map [b, gh, gw, d] the patch
  tokens, every cell valid.
  """
  config: ClipVisionConfig
  adapters = NO_ADAPTERS  # a frozen feature extractor, inside any adapted model too

  @nn.compact
  def __call__(self, image) -> VisionFeatures:
    cfg = self.config
    dtype = cfg.activation_dtype
    x, grid = embed_with_class_token(self, image, width=cfg.width, patch_size=cfg.patch_size,
                                     grid_size=cfg.grid_size, dtype=dtype)
    x = layer_norm("pre_norm", dtype, cfg.layer_norm_eps)(x)
    x = Transformer(cfg, layer_scale=False, final_norm=False, name="Transformer")(x)
    return grid_features(x, 1, grid)
