"""Named model sizes: a vision tower (ViT) and a text encoder-decoder (T5.1.1 / UL2).

Configs are frozen dataclasses so they hash (the flax modules hold them as
static fields). gin binds their fields, as t5x's model gin files do:
`gin_configs/models/*.gin` list each named size's dimensions,

    PaliModel.config = @PaliConfig()
    PaliConfig.text = @T5Config()
    T5Config.emb_dim = 2048
    ...

and an experiment changes one field (`T5Config.dtype = 'bfloat16'`); gin itself
refuses a field the config does not have. From Python the same sizes are
`CONFIGS[name]` (`PaliModel('mini')`); a test keeps the two equal.

Published shapes: T5.1.1 (Raffel et al. 2020, "t5.1.1" gin configs: gated-GELU,
untied logits), UL2 (Tay et al. 2022; 3B at T5.1.1-XL's shape, as PaLI-3 uses
it), SigLIP-G/14 (Zhai et al. 2023; ViT-G/14 of Zhai et al. 2022), PaLI-3 (Chen
et al. 2023: SigLIP-G/14 + UL2-3B, the multilingual mT5 vocabulary).
"""
import dataclasses
from typing import Dict, Optional

import gin
import jax.numpy as jnp

from omni_smola.models import layer_stack

T5_VOCAB_SIZE = 32128  # 32,000 SentencePiece pieces + 100 extra ids, padded to 128
MT5_VOCAB_SIZE = 250112


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """A SigLIP-style ViT image encoder (no pooling head).

  Attributes:
    image_size: the side of the (square) training image; the position embedding
      grid is `image_size // patch_size` squared. Other input sizes resample it.
    adapt: route the projections through the adapter hook (off: the vision
      tower stays a plain frozen ViT, as in Omni-SMoLA).
    remat, remat_policy: rematerialise each block in the backward pass, keeping
      what the `jax.checkpoint_policies` policy of that name saves.
    scan_layers: one `nn.scan` over the blocks (`Transformer/encoderblock/...` with
      a leading layer axis, as big_vision's scanned ViTs) instead of
      `encoderblock_{i}`; see `models.layer_stack`.
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 14
  image_size: int = 224
  dropout_rate: float = 0.0
  adapt: bool = False
  dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False

  def __post_init__(self):
    layer_stack.check_remat_policy("ViTConfig", self.remat_policy)

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  """A T5.1.1 / UL2 encoder-decoder.

  Attributes:
    logits_via_embedding: tie the output layer to the token embedding (T5 1.0);
      T5.1.1 and UL2 have a separate `logits_dense`.
    mlp_activation: the gate's activation in the gated MLP: `gelu` (tanh
      approximation; T5.1.1's `gated-gelu`) or `silu` (UL2's `gated-silu`).
    dtype: activation dtype (`float32` or `bfloat16`); parameters stay float32.
    remat, remat_policy: rematerialise each layer in the backward pass (`nn.remat`),
      keeping what the `jax.checkpoint_policies` policy of that name saves.
    scan_layers: each stack as one `nn.scan` (`encoder/layers/...` with a leading
      layer axis) instead of `layers_{i}`: one layer to trace and compile instead of
      all of them; see `models.layer_stack`.
  """
  emb_dim: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_encoder_layers: int
  num_decoder_layers: int
  vocab_size: int = T5_VOCAB_SIZE
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  logits_via_embedding: bool = False
  layer_norm_epsilon: float = 1e-6
  mlp_activation: str = "gelu"
  dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False

  def __post_init__(self):
    layer_stack.check_remat_policy("T5Config", self.remat_policy)

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PaliConfig:
  """A PaLI-like model; `vision=None` is a text-only encoder-decoder."""
  text: T5Config
  vision: Optional[ViTConfig] = None


# The published sizes scan their layers (compile time; models.layer_stack); the unit-test
# and demo sizes stay unrolled, so per-layer checkpoints and routing stay the simple case.
def _t5(emb, heads, mlp, layers, head_dim=64, **kw) -> T5Config:
  return T5Config(emb_dim=emb, num_heads=heads, head_dim=head_dim, mlp_dim=mlp,
                  num_encoder_layers=layers, num_decoder_layers=layers, scan_layers=True, **kw)


_SIGLIP_G14 = ViTConfig(width=1664, depth=48, mlp_dim=8192, num_heads=16, patch_size=14,
                        image_size=224, scan_layers=True)

CONFIGS: Dict[str, PaliConfig] = {
    # Unit tests: every dimension distinct where it can be, so a transposed axis fails.
    "tiny": PaliConfig(
        text=T5Config(emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_encoder_layers=2,
                      num_decoder_layers=2, vocab_size=512),
        vision=ViTConfig(width=24, depth=2, mlp_dim=48, num_heads=4, patch_size=8,
                         image_size=16)),
    # CPU demo: trains in minutes on a laptop; the offline mixture's ~1000-piece
    # SentencePiece model fits the vocabulary (override `text.vocab_size` to match).
    "mini": PaliConfig(
        text=T5Config(emb_dim=128, num_heads=4, head_dim=32, mlp_dim=256,
                      num_encoder_layers=2, num_decoder_layers=2, vocab_size=1024),
        vision=ViTConfig(width=128, depth=2, mlp_dim=256, num_heads=4, patch_size=8,
                         image_size=32)),
    "t5_1_1_small": PaliConfig(text=_t5(512, 6, 1024, 8)),
    "t5_1_1_base": PaliConfig(text=_t5(768, 12, 2048, 12)),
    "t5_1_1_large": PaliConfig(text=_t5(1024, 16, 2816, 24)),
    "t5_1_1_xl": PaliConfig(text=_t5(2048, 32, 5120, 24)),
    # UL2 has T5.1.1-XL's shape with a gated-SiLU MLP.
    "ul2_3b": PaliConfig(text=_t5(2048, 32, 5120, 24, mlp_activation="silu")),
    "pali3": PaliConfig(text=_t5(2048, 32, 5120, 24, vocab_size=MT5_VOCAB_SIZE,
                                 mlp_activation="silu"),
                        vision=_SIGLIP_G14),
}


def get_config(name: str) -> PaliConfig:
  """The named config; change a field with `dataclasses.replace` (gin: bind the field)."""
  if name not in CONFIGS:
    raise KeyError(f"unknown model config {name!r}; known: {sorted(CONFIGS)}")
  return CONFIGS[name]


# ----------------------------------------------------------------------------- MoME's towers
# The vision experts of MoME (Shen et al. 2024): DINOv2, Pix2Struct's encoder and a CLIP ViT
# (the stand-in for EVA-CLIP, which transformers does not ship). Frozen feature extractors:
# they never carry adapters. `checkpoints.hf_vision_towers` reads them from transformers.

PRENORM_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")  # models.vit_blocks.ACTIVATIONS


def _check_choice(owner: str, field: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{owner}.{field}={value!r} is not one of {sorted(choices)}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DinoV2Config:
  """A DINOv2 ViT (Oquab et al. 2023; Darcet et al. 2024 for the registers).

  Attributes:
    image_size: the side of the square training image; other sizes resize the patch
      position embeddings (torch's bicubic, as transformers does).
    num_register_tokens: learned tokens between the class token and the patches, without
      position embeddings (0: plain DINOv2, as MoME uses it).
    antialias: resize position embeddings with torch's antialiased bicubic
      (transformers' `Dinov2WithRegistersModel` does; `Dinov2Model` does not).
    layer_scale: per-channel scales on both residual branches (DINOv2's LayerScale).
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 14
  image_size: int = 518
  num_register_tokens: int = 0
  antialias: bool = False
  layer_scale: bool = True
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False

  def __post_init__(self):
    layer_stack.check_remat_policy("DinoV2Config", self.remat_policy)
    _check_choice("DinoV2Config", "activation", self.activation, PRENORM_ACTIVATIONS)

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
  """A CLIP ViT image encoder (Radford et al. 2021): class token, a LayerNorm before the
  blocks, quick-GELU MLPs, LayerNorm eps 1e-5; the tokens come out of the last block
  without a final norm (CLIP's `post_layernorm` only normalises the pooled class token).

  Attributes:
    image_size: the side of the square training image; other sizes resize the patch
      position embeddings (torch's bicubic, transformers' `interpolate_pos_encoding`).
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 14
  image_size: int = 224
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False

  def __post_init__(self):
    layer_stack.check_remat_policy("ClipVisionConfig", self.remat_policy)
    _check_choice("ClipVisionConfig", "activation", self.activation, PRENORM_ACTIVATIONS)

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Pix2StructVisionConfig:
  """Pix2Struct's image encoder (Lee et al. 2023): T5-style blocks over variable-aspect-ratio
  patches with learned row and column embeddings (`models.pix2struct_patches` makes them).

  Attributes:
    head_dim: transformers' `d_kv` (Pix2Struct's heads need not divide the width).
    num_positions: rows (and columns) the embedding tables hold (transformers' `seq_len`).
    max_patches: the patch budget of an image; row and column ids reach it, so it must
      stay below `num_positions`.
    max_aspect_ratio: the longest side over the shortest an image may have; it bounds the
      feature-map canvas (`feature_grid`) every image's patch grid fits in.
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  head_dim: int
  patch_size: int = 16
  num_positions: int = 4096
  max_patches: int = 2048
  max_aspect_ratio: float = 4.0
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False

  def __post_init__(self):
    layer_stack.check_remat_policy("Pix2StructVisionConfig", self.remat_policy)
    if self.max_patches >= self.num_positions:
      raise ValueError(f"Pix2StructVisionConfig.max_patches={self.max_patches} must be below "
                       f"num_positions={self.num_positions}: row and column ids reach "
                       "max_patches and index tables of num_positions rows")
    if self.max_aspect_ratio < 1:
      raise ValueError("Pix2StructVisionConfig.max_aspect_ratio="
                       f"{self.max_aspect_ratio} must be >= 1 (longest side / shortest)")

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * 3

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)
