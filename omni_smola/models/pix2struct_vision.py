"""Pix2Struct's image encoder (Lee et al. 2023): MoME's vision expert for text-rich images.

Numerics as transformers' `Pix2StructVisionModel`: a linear patch projection (with bias)
plus learned row and column embeddings (1-based ids, 0 for padding), then T5-style blocks:
RMSNorm without mean subtraction (eps 1e-6), attention without biases and without the
1/sqrt(head_dim) logit scaling, a gated-GELU (tanh) MLP; a final RMSNorm. Padding patches
are masked out as attention keys, so they never change a valid patch's output.

Input: `models.pix2struct_patches.FlattenedPatches`, batched.

Parameters (`{i}` a layer; the layers' names are T5X's, as `models.t5`):
    patch_projection/{kernel [p*p*3, d], bias [d]}
    row_embedding [num_positions, d]   col_embedding [num_positions, d]
    layers_{i}/pre_attention_layer_norm/scale   layers_{i}/attention/{query,key,value,out}/kernel
    layers_{i}/pre_mlp_layer_norm/scale         layers_{i}/mlp/{wi_0,wi_1,wo}/kernel
    encoder_norm/scale
"""
import flax.linen as nn
import jax.numpy as jnp

from omni_smola.models.pix2struct_patches import canvas_grid
from omni_smola.models import layer_stack
from omni_smola.models.attention import MultiHeadAttention
from omni_smola.models.configs import Pix2StructVisionConfig
from omni_smola.models.layers import BiasedAdaptedDense, RMSNorm, constrain
from omni_smola.models.t5 import MlpBlock
from omni_smola.models.vision_features import VisionFeatures, scattered_features
from omni_smola.nn import NO_ADAPTERS, TokenContext
from omni_smola.nn.stored_param import stored_param


class EncoderLayer(nn.Module):
  config: Pix2StructVisionConfig

  @nn.compact
  def __call__(self, x, context, key_mask):
    cfg = self.config
    dtype = cfg.activation_dtype
    y = RMSNorm(cfg.layer_norm_eps, dtype, name="pre_attention_layer_norm")(x)
    y = MultiHeadAttention(cfg.num_heads, cfg.head_dim, init_style="t5", dtype=dtype,
                           name="attention")(y, y, context, context, mask=key_mask)
    x = constrain(x + y)
    y = RMSNorm(cfg.layer_norm_eps, dtype, name="pre_mlp_layer_norm")(x)
    y = MlpBlock(cfg.mlp_dim, activation="gelu", dtype=dtype, name="mlp")(y, context)
    return constrain(x + y)


class Pix2StructVision(nn.Module):
  """patches [b, n, p*p*3], row_ids, col_ids [b, n] int -> `VisionFeatures`.

  tokens [b, n, d] (padding positions included, as transformers returns them);
  feature_map [b, rows, cols, d] on the canvas `canvas_grid(max_patches, max_aspect_ratio)`,
  feature_mask [b, rows, cols] true where an image's patch landed.
  """
  config: Pix2StructVisionConfig
  adapters = NO_ADAPTERS  # a frozen feature extractor, inside any adapted model too

  @nn.compact
  def __call__(self, patches, row_ids, col_ids) -> VisionFeatures:
    cfg = self.config
    dtype = cfg.activation_dtype
    if patches.shape[-1] != cfg.patch_dim:
      raise ValueError(f"patches of {patches.shape[-1]} values do not match "
                       f"Pix2StructVisionConfig.patch_size={cfg.patch_size} "
                       f"({cfg.patch_dim} values per RGB patch)")
    if patches.shape[1] > cfg.max_patches:
      raise ValueError(f"{patches.shape[1]} patches exceed "
                       f"Pix2StructVisionConfig.max_patches={cfg.max_patches}")
    x = BiasedAdaptedDense(features=cfg.width, kernel_axes=(None, "embed"), dtype=dtype,
                           kernel_init=nn.initializers.lecun_normal(),
                           name="patch_projection")(patches.astype(dtype))
    embedding_init = nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0),
                                                  ("position", "embed"))
    rows = stored_param(self, "row_embedding", embedding_init,
                        (cfg.num_positions, cfg.width), jnp.float32)
    cols = stored_param(self, "col_embedding", embedding_init,
                        (cfg.num_positions, cfg.width), jnp.float32)
    x = x + jnp.take(jnp.asarray(rows, dtype), row_ids, axis=0) + jnp.take(
        jnp.asarray(cols, dtype), col_ids, axis=0)
    x = constrain(x)
    valid = row_ids > 0  # [b, n]
    context = TokenContext(valid=valid, num_visual_tokens=x.shape[1])
    x = layer_stack.apply_layers(
        self, EncoderLayer, x, context, valid[:, None, None, :],  # keys masked: [b, 1, 1, k]
        num_layers=cfg.depth, name="layers", scan=cfg.scan_layers, remat=cfg.remat,
        remat_policy=cfg.remat_policy, config=cfg)
    x = RMSNorm(cfg.layer_norm_eps, dtype, name="encoder_norm")(x)
    return scattered_features(x, row_ids, col_ids,
                              canvas_grid(cfg.max_patches, cfg.max_aspect_ratio))
