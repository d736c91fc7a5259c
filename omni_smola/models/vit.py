"""SigLIP-style ViT image encoder: patch tokens out, no pooling head.

Patch embedding (a stride-`patch` convolution, computed as a matmul over
flattened patches), learned position embedding, pre-LayerNorm blocks with
biases, GELU (tanh approximation) MLP, final LayerNorm; LayerNorm eps 1e-6 and
1/sqrt(head_dim) query scaling, as SigLIP (big_vision, `transformers`' SiglipVisionModel).

Parameters, in big_vision's layout (`{i}` a block):
    embedding/{kernel [p, p, 3, width], bias [width]}
    pos_embedding                                               [1, grid*grid, width]
    Transformer/encoderblock_{i}/LayerNorm_{0,1}/{scale,bias}
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value}/
        {kernel [width, heads, head_dim], bias [heads, head_dim]}
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/out/
        {kernel [heads, head_dim, width], bias [width]}
    Transformer/encoderblock_{i}/MlpBlock_0/Dense_{0,1}/{kernel, bias}
    Transformer/encoder_norm/{scale,bias}
With `ViTConfig.adapt`, the projections carry adapters; `AdapterSpec.sites` match their
parameter paths, `img/Transformer/encoderblock_{i}/MlpBlock_0/Dense_0`, ... in PaLI.

An image whose patch grid differs from the configured one gets its position
embeddings resampled on the fly (`resample_position_embedding`, also used when
importing a checkpoint trained at another resolution).
"""
import functools
import math
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_smola.models import layer_stack
from omni_smola.models.attention import MultiHeadAttention
from omni_smola.models.configs import ViTConfig
from omni_smola.models.layers import BiasedAdaptedDense, constrain
from omni_smola.nn import NO_ADAPTERS, AdapterPlan, TokenContext
from omni_smola.nn.stored_param import stored_param

_XAVIER = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def resample_position_embedding(posemb, target: Union[int, Sequence[int]]):
  """Bilinearly resizes the position embeddings of a square grid.

  Args:
    posemb: [1, n, width] or [n, width] (numpy or jax), n a square number.
    target: the new number of tokens (a square grid) or the grid (rows, cols).
  Returns:
    [1, rows*cols, width] (or [rows*cols, width]), numpy in numpy out.
  """
  is_numpy = isinstance(posemb, np.ndarray)
  batched = posemb.ndim == 3
  grid = posemb[0] if batched else posemb
  n, width = grid.shape
  old = math.isqrt(n)
  if old * old != n:
    raise ValueError(f"position embeddings of {n} tokens are not a square grid")
  if isinstance(target, int):
    side = math.isqrt(target)
    if side * side != target:
      raise ValueError(f"cannot resample to {target} tokens: not a square grid")
    target = (side, side)
  rows, cols = target
  resized = jax.image.resize(jnp.asarray(grid, jnp.float32).reshape(old, old, width),
                             (rows, cols, width), method="bilinear")
  resized = resized.reshape(rows * cols, width).astype(grid.dtype)
  resized = resized[None] if batched else resized
  return np.asarray(resized) if is_numpy else resized


def layer_norm(name: str, dtype, epsilon: float = 1e-6):
  """LayerNorm with its scale and bias on the `embed` axis (the ViTs' and ADT's)."""
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class PatchEmbedding(nn.Module):
  """[b, H, W, C] -> [b, (H/p)*(W/p), width]; the kernel is a conv's [p, p, C, width]."""
  width: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image):
    batch, height, width, channels = image.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"image {height}x{width} is not a multiple of the patch size {p}")
    kernel = stored_param(self, "kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, None, "channels", "embed")),
                          (p, p, channels, self.width), jnp.float32)
    bias = stored_param(self, "bias", nn.with_logical_partitioning(
        nn.initializers.zeros, ("embed",)), (self.width,), jnp.float32)
    patches = image.reshape(batch, height // p, p, width // p, p, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, p, p, channels)
    tokens = jnp.einsum("bnijc,ijcd->bnd", patches.astype(self.dtype),
                        jnp.asarray(kernel, self.dtype))
    return tokens + jnp.asarray(bias, self.dtype)


class MlpBlock(nn.Module):
  """Dense_1(dropout(activation(Dense_0(x)))), with biases: every ViT tower's MLP.

  SigLIP's activation is the tanh-approximated GELU; `vit_blocks` passes DINOv2's and
  CLIP's. Dropout is the identity at rate 0 (and has no parameters).
  """
  mlp_dim: int
  activation: Callable[[jnp.ndarray], jnp.ndarray] = functools.partial(nn.gelu,
                                                                       approximate=True)
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    def dense(name, features, axes):
      return BiasedAdaptedDense(features=features, kernel_axes=axes, dtype=self.dtype,
                                kernel_init=_XAVIER, name=name)
    hidden = self.activation(dense("Dense_0", self.mlp_dim, ("embed", "mlp"))(x, context))
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=self.deterministic)
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    return dense("Dense_1", x.shape[-1], ("mlp", "embed"))(hidden, context)


class EncoderBlock(nn.Module):
  config: ViTConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, context):
    cfg = self.config
    dtype = cfg.activation_dtype
    drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
    y = layer_norm("LayerNorm_0", dtype)(x)
    y = MultiHeadAttention(cfg.num_heads, cfg.width // cfg.num_heads, init_style="vit",
                           dropout_rate=cfg.dropout_rate, deterministic=self.deterministic,
                           dtype=dtype, name="MultiHeadDotProductAttention_0")(
                               y, y, context, context)
    x = constrain(x + drop(y))
    y = layer_norm("LayerNorm_1", dtype)(x)
    y = MlpBlock(cfg.mlp_dim, dropout_rate=cfg.dropout_rate, deterministic=self.deterministic,
                 dtype=dtype, name="MlpBlock_0")(y, context)
    return constrain(x + drop(y))


class Transformer(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x, enable_dropout: bool = False):
    cfg = self.config
    context = TokenContext(num_visual_tokens=x.shape[1])  # every token is visual
    x = layer_stack.apply_layers(
        self, EncoderBlock, x, context, num_layers=cfg.depth, name="encoderblock",
        scan=cfg.scan_layers, remat=cfg.remat, remat_policy=cfg.remat_policy, config=cfg,
        deterministic=not enable_dropout)
    return layer_norm("encoder_norm", cfg.activation_dtype)(x)


class ViT(nn.Module):
  """Image [b, H, W, 3] in [-1, 1] -> patch tokens [b, n, width].

  Its projections carry the model's adapters only when `ViTConfig.adapt` is on
  (`adapters`: None defers to the enclosing model's plan, `NO_ADAPTERS` stops it).
  """
  config: ViTConfig

  @property
  def adapters(self) -> Optional[AdapterPlan]:
    return None if self.config.adapt else NO_ADAPTERS

  @nn.compact
  def __call__(self, image, enable_dropout: bool = False) -> jnp.ndarray:
    cfg = self.config
    dtype = cfg.activation_dtype
    x = PatchEmbedding(cfg.width, cfg.patch_size, dtype, name="embedding")(image)
    posemb = stored_param(
        self, "pos_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.width ** -0.5),
                                     (None, "position", "embed")),
        (1, cfg.num_patches, cfg.width), jnp.float32)
    grid = (image.shape[1] // cfg.patch_size, image.shape[2] // cfg.patch_size)
    if grid != (cfg.grid_size, cfg.grid_size):
      posemb = resample_position_embedding(posemb, grid)
    x = x + jnp.asarray(posemb, dtype)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not enable_dropout)
    x = constrain(x)
    return Transformer(cfg, name="Transformer")(x, enable_dropout)
