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
