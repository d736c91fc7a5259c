"""The pieces DINOv2 and CLIP share: a class-token patch embedding and a pre-norm block.

Both are ViTs with a class token, learned position embeddings resized bicubically for
other resolutions, and pre-LayerNorm blocks with biased projections and 1/sqrt(head_dim)
query scaling. They differ in the MLP's activation, LayerNorm eps, DINOv2's LayerScale and
register tokens, and CLIP's LayerNorm before the first block; the towers
(`models.dinov2`, `models.clip_vision`) pass those as fields.

Parameters of one block (big_vision's names, as `models.vit`):
    LayerNorm_{0,1}/{scale,bias}
    MultiHeadDotProductAttention_0/{query,key,value}/{kernel [d, h, k], bias [h, k]}
    MultiHeadDotProductAttention_0/out/{kernel [h, k, d], bias [d]}
    LayerScale_{0,1}/scale [d]          (with layer_scale)
    MlpBlock_0/Dense_{0,1}/{kernel, bias}
"""
import functools
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_smola.models import bicubic, layer_stack
from omni_smola.models.attention import MultiHeadAttention
from omni_smola.models.layers import constrain
from omni_smola.models.vit import MlpBlock, PatchEmbedding, layer_norm
from omni_smola.nn import TokenContext
from omni_smola.nn.stored_param import stored_param

ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),  # DINOv2 (torch's exact GELU)
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
}


def embed_with_class_token(owner: nn.Module, image, *, width: int, patch_size: int,
                           grid_size: int, num_register_tokens: int = 0,
                           antialias: bool = False, dtype=jnp.float32
                           ) -> Tuple[jnp.ndarray, Tuple[int, int]]:
  """Image [b, H, W, 3] -> tokens [b, 1 + registers + gh*gw, d] and the grid (gh, gw).

  Creates `owner`'s parameters (call it from `owner`'s compact method):
    embedding/{kernel [p, p, 3, d], bias [d]}, cls [1, 1, d],
    pos_embedding [1, 1 + grid_size**2, d], registers [1, registers, d].
  The class token gets the first position embedding; the patch ones are resized
  (torch's bicubic, see `models.bicubic`) when the image's grid is not
  `grid_size`**2. Registers follow the class token and have no position (DINOv2).
  """
  patches = PatchEmbedding(width, patch_size, dtype, name="embedding")(image)
  batch = patches.shape[0]
  grid = (image.shape[1] // patch_size, image.shape[2] // patch_size)
  cls = owner.param("cls", nn.with_logical_partitioning(nn.initializers.zeros,
                                                        (None, None, "embed")),
                    (1, 1, width), jnp.float32)
  posemb = owner.param("pos_embedding", nn.with_logical_partitioning(
      nn.initializers.normal(stddev=0.02), (None, "position", "embed")),
                       (1, 1 + grid_size * grid_size, width), jnp.float32)
  patch_posemb = posemb[0, 1:]
  if grid != (grid_size, grid_size):
    patch_posemb = bicubic.resize_square_grid(patch_posemb, grid, antialias)
  x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls + posemb[:, :1], dtype),
                                        (batch, 1, width)),
                       patches + jnp.asarray(patch_posemb, dtype)], axis=1)
  if num_register_tokens:
    registers = owner.param("registers", nn.with_logical_partitioning(
        nn.initializers.zeros, (None, None, "embed")),
                            (1, num_register_tokens, width), jnp.float32)
    registers = jnp.broadcast_to(jnp.asarray(registers, dtype),
                                 (batch, num_register_tokens, width))
    x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
  return constrain(x), grid


class LayerScale(nn.Module):
  """x * scale, a learned per-channel scale on a residual branch (DINOv2, CaiT)."""

  @nn.compact
  def __call__(self, x):
    scale = stored_param(self, "scale", nn.with_logical_partitioning(
        nn.initializers.ones, ("embed",)), (x.shape[-1],), jnp.float32)
    return x * jnp.asarray(scale, x.dtype)


class PreNormBlock(nn.Module):
  """x + ls_0(attn(LN_0(x))), then x + ls_1(mlp(LN_1(x))); ls the identity without layer_scale."""
  num_heads: int
  mlp_dim: int
  activation: str
  layer_norm_eps: float
  layer_scale: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    width = x.shape[-1]
    scale = (lambda name: LayerScale(name=name)) if self.layer_scale else (
        lambda name: lambda y: y)
    y = layer_norm("LayerNorm_0", self.dtype, self.layer_norm_eps)(x)
    y = MultiHeadAttention(self.num_heads, width // self.num_heads, init_style="vit",
                           dtype=self.dtype, name="MultiHeadDotProductAttention_0")(
                               y, y, context, context)
    x = constrain(x + scale("LayerScale_0")(y))
    y = layer_norm("LayerNorm_1", self.dtype, self.layer_norm_eps)(x)
    y = MlpBlock(self.mlp_dim, ACTIVATIONS[self.activation], dtype=self.dtype,
                 name="MlpBlock_0")(y, context)
    return constrain(x + scale("LayerScale_1")(y))


class Transformer(nn.Module):
  """`config.depth` pre-norm blocks `encoderblock_{i}` (or one scanned `encoderblock`),
  then a LayerNorm `encoder_norm` when `final_norm`.

  `config` is a `DinoV2Config` or `ClipVisionConfig` (the fields both have).
  """
  config: Any
  layer_scale: bool
  final_norm: bool

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    context = TokenContext(num_visual_tokens=x.shape[1])  # every token is visual
    x = layer_stack.apply_layers(
        self, PreNormBlock, x, context, num_layers=cfg.depth, name="encoderblock",
        scan=cfg.scan_layers, remat=cfg.remat, remat_policy=cfg.remat_policy,
        num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, activation=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps, layer_scale=self.layer_scale,
        dtype=cfg.activation_dtype)
    if self.final_norm:
      x = layer_norm("encoder_norm", cfg.activation_dtype, cfg.layer_norm_eps)(x)
    return x
