"""DINOv2 ViT (Oquab et al. 2023), optionally with registers (Darcet et al. 2024): MoME's
self-supervised vision expert.

Numerics as transformers' `Dinov2Model` / `Dinov2WithRegistersModel`: class token, patch
position embeddings resized with torch's bicubic for other resolutions (antialiased in the
registers variant), register tokens after the class token without positions, pre-norm
blocks with LayerScale on both branches, exact GELU, LayerNorm eps 1e-6, a final LayerNorm.

Parameters (`{i}` a block; the block's own in `models.vit_blocks`):
    embedding/{kernel [p, p, 3, d], bias [d]}
    cls [1, 1, d]   pos_embedding [1, 1 + grid**2, d]   registers [1, r, d]
    Transformer/encoderblock_{i}/...
    Transformer/encoder_norm/{scale, bias}
"""
import flax.linen as nn

from omni_smola.models.configs import DinoV2Config
from omni_smola.models.vision_features import VisionFeatures, grid_features
from omni_smola.models.vit_blocks import Transformer, embed_with_class_token
from omni_smola.nn import NO_ADAPTERS


class DinoV2(nn.Module):
  """Image [b, H, W, 3] (normalised as the checkpoint expects) -> `VisionFeatures`.

  tokens [b, 1 + registers + gh*gw, d] (class token first); feature_map [b, gh, gw, d]
  the patch tokens, every cell valid. H and W need only be multiples of the patch size.
  """
  config: DinoV2Config
  adapters = NO_ADAPTERS  # a frozen feature extractor, inside any adapted model too

  @nn.compact
  def __call__(self, image) -> VisionFeatures:
    cfg = self.config
    x, grid = embed_with_class_token(
        self, image, width=cfg.width, patch_size=cfg.patch_size, grid_size=cfg.grid_size,
        num_register_tokens=cfg.num_register_tokens, antialias=cfg.antialias,
        dtype=cfg.activation_dtype)
    x = Transformer(cfg, layer_scale=cfg.layer_scale, final_norm=True, name="Transformer")(x)
    return grid_features(x, 1 + cfg.num_register_tokens, grid)
