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
import math
from typing import Any, Dict, Optional, Tuple

import gin
import jax.numpy as jnp

from omni_smola.models import layer_stack
from omni_smola.models.pix2struct_patches import Pix2StructPatching

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
    mome_mole: MoME's MoLE beside every FFN of the encoder and the decoder
      (`BottleneckMoLEConfig`; `.../layers_{i}/mome_mole/...`); None: none.
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
  mome_mole: Optional["BottleneckMoLEConfig"] = None

  def __post_init__(self):
    layer_stack.check_remat_policy("T5Config", self.remat_policy)
    if self.mome_mole is not None and not isinstance(self.mome_mole, BottleneckMoLEConfig):
      raise ValueError(f"T5Config.mome_mole must be a BottleneckMoLEConfig (gin: "
                       f"@BottleneckMoLEConfig()), got {self.mome_mole!r}")

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PaliConfig:
  """A PaLI-like model; `vision=None` is a text-only encoder-decoder.

  Attributes:
    move: MoME's mixture of vision experts (`MoVEConfig`) in place of the ViT's tokens
      alone: the ViT (tower `'img'`, `PALI_VIT_TOWER`) and `vision_towers` each give a
      feature map, MoVE fuses them into the visual tokens (`models.move`). None: PaLI.
    vision_towers: MoME's other towers, `((name, config), ...)` with a `DinoV2Config`,
      `ClipVisionConfig` or `Pix2StructVisionConfig` each (`vision_towers/<name>/...`).
  """
  text: T5Config
  vision: Optional[ViTConfig] = None
  move: Optional["MoVEConfig"] = None
  vision_towers: Tuple[Tuple[str, Any], ...] = ()

  def __post_init__(self):
    check_mome_towers(self)

  @property
  def pix2struct_patching(self):
    """The Pix2Struct towers' `Pix2StructPatching`, cut on the host from the unsquashed
    image (`data.pix2struct_inputs`); None without such a tower. Every Pix2Struct tower
    reads the same patches (the batch carries one set): they must cut alike."""
    cuts = {name: c.patching for name, c in self.vision_towers
            if isinstance(c, Pix2StructVisionConfig)}
    if len(set(cuts.values())) > 1:
      raise ValueError(f"PaliConfig.vision_towers: the Pix2Struct towers cut their patches "
                       f"differently ({cuts}), but a batch carries one set of host-cut "
                       "patches: give them the same patch_size, max_patches and "
                       "max_aspect_ratio")
    return next(iter(cuts.values()), None)


# ----------------------------------------------------------------------------- MoME's towers
# The vision experts of MoME (Shen et al. 2024): DINOv2, Pix2Struct's encoder and a CLIP ViT
# (the stand-in for EVA-CLIP, which transformers does not ship). Frozen feature extractors:
# they never carry adapters. `checkpoints.hf_vision_towers` reads them from transformers.

PRENORM_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")  # models.vit_blocks.ACTIVATIONS


def _check_choice(owner: str, field: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{owner}.{field}={value!r} is not one of {sorted(choices)}")


class _ClassTokenViT:
  """What the class-token ViT towers' configs (DINOv2, CLIP) share beyond their fields."""

  def __post_init__(self):
    name = type(self).__name__
    layer_stack.check_remat_policy(name, self.remat_policy)
    _check_choice(name, "activation", self.activation, PRENORM_ACTIVATIONS)

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DinoV2Config(_ClassTokenViT):
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


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(_ClassTokenViT):
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
    return self.patching.patch_dim

  @property
  def patching(self) -> Pix2StructPatching:
    """What the input pipeline needs to cut this tower's patches."""
    return Pix2StructPatching(self.patch_size, self.max_patches, self.max_aspect_ratio)

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)


# ----------------------------------------------------------------------------- MoME's PaLI
# MoME's mixture of vision experts (MoVE: one ADT per tower, an instruction router) and its
# MoLE (bottleneck experts beside each FFN), as configs of a PaLI model (docs/DESIGN.md §3.7).

PALI_VIT_TOWER = "img"  # the PaLI ViT's name among MoVE's towers (its parameters: `img/...`)
TOWER_CONFIGS = (DinoV2Config, ClipVisionConfig, Pix2StructVisionConfig)
MOVE_TRANSFORMS = ("adt", "average_pool")  # models.move.TRANSFORMS
MOVE_FUSIONS = ("router", "addition")  # models.move.FUSIONS


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ADTConfig:
  """One tower's adaptive deformable transformation (`models.adt.ADT`).

  Attributes:
    num_queries: L, the tokens out; a square number (the query grid is sqrt(L)
      on each side), at most the tower's grid on each side.
    num_layers: M (MoME: 6).
    num_heads: Nh of the self- and cross-attention (MoME: 8).
    num_points: Np sampling points per head (MoME: 4).
    mlp_ratio: the FFN's hidden width over the tower's width.
    dtype: activation dtype; parameters stay float32.
  """
  num_queries: int = 64
  num_layers: int = 6
  num_heads: int = 8
  num_points: int = 4
  mlp_ratio: int = 4
  dtype: str = "float32"

  @property
  def grid_side(self) -> int:
    side = math.isqrt(self.num_queries) if self.num_queries > 0 else 0
    if side < 1 or side * side != self.num_queries:
      raise ValueError(f"ADTConfig.num_queries={self.num_queries} is not a positive square "
                       "number (the queries are a square grid)")
    return side

  def check_feature_grid(self, height: int, width: int, where: str) -> int:
    """The query grid's side; fails when L is larger than the tower's grid."""
    side = self.grid_side
    if side > height or side > width:
      raise ValueError(
          f"ADTConfig.num_queries={self.num_queries} (a {side}x{side} query grid) is larger "
          f"than {where}'s feature grid {height}x{width}")
    return side


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MoVEConfig:
  """The MoVE front end (`models.move.MoVE`).

  Attributes:
    tower_names: one per vision tower, in the order of the feature maps; they name
      the transformations' parameters (`transform_<tower>`).
    width: the common width every transformation projects to.
    transform: 'adt' (the paper's) or 'average_pool' (its ablation).
    fusion: 'router' (the paper's instruction router) or 'addition' (its ablation).
    router_hidden_dim: W1's width; None: the instruction embedding's.
    adt: the transformations' settings (one per tower, same settings).
  """
  tower_names: Tuple[str, ...]
  width: int
  transform: str = "adt"
  fusion: str = "router"
  router_hidden_dim: Optional[int] = None
  adt: ADTConfig = ADTConfig()

  def __post_init__(self):
    if not self.tower_names:
      raise ValueError(f"MoVEConfig.tower_names={tuple(self.tower_names)!r}: MoVE needs at "
                       "least one tower (the router would weigh zero towers)")
    if len(set(self.tower_names)) != len(self.tower_names):
      raise ValueError(f"MoVEConfig.tower_names={tuple(self.tower_names)!r} repeats a name")
    for field, known in (("transform", MOVE_TRANSFORMS), ("fusion", MOVE_FUSIONS)):
      if getattr(self, field) not in known:
        raise ValueError(f"MoVEConfig.{field}={getattr(self, field)!r}; known: {sorted(known)}")
    if self.fusion == "router" and len(self.tower_names) == 1:
      raise ValueError(
          f"MoVEConfig.fusion='router' over one tower {tuple(self.tower_names)!r} always "
          "weighs it 1 and would train nothing: use fusion='addition'")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BottleneckMoLEConfig:
  """MoME's MoLE beside each FFN of the text model (`nn.mome_mole.BottleneckMoLE`).

  Attributes:
    num_experts: K (the paper's figure draws 4); 1: stage 1's single adapter, no router.
    bottleneck_dim: r (MoME: 64).
    router_hidden_dim: the router's W1 width; None: the instruction embedding's.
  """
  num_experts: int = 4
  bottleneck_dim: int = 64
  router_hidden_dim: Optional[int] = None

  def __post_init__(self):
    for field in ("num_experts", "bottleneck_dim"):
      if getattr(self, field) < 1:
        raise ValueError(f"BottleneckMoLEConfig.{field}={getattr(self, field)} must be >= 1 "
                         "(zero would add a MoLE that computes nothing)")


def check_mome_towers(config: "PaliConfig") -> None:
  """MoVE's tower names must be exactly the PaLI ViT and `vision_towers`: none unused."""
  if config.move is None:
    if config.vision_towers:
      raise ValueError(
          f"PaliConfig.vision_towers names {[n for n, _ in config.vision_towers]} but "
          "PaliConfig.move is None: nothing would read them (bind PaliConfig.move = "
          "@MoVEConfig(), or drop the towers)")
    return
  if not isinstance(config.move, MoVEConfig):
    raise ValueError(f"PaliConfig.move must be a MoVEConfig (gin: @MoVEConfig()), "
                     f"got {config.move!r}")
  if config.vision is None:
    raise ValueError(f"PaliConfig.move needs PaliConfig.vision: the PaLI ViT is MoVE's tower "
                     f"{PALI_VIT_TOWER!r}, and its image_size is the model's input size")
  names = []
  for entry in config.vision_towers:
    if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
      raise ValueError(f"PaliConfig.vision_towers entry {entry!r} is not (name, config)")
    name, tower = entry
    if not isinstance(tower, TOWER_CONFIGS):
      raise ValueError(f"PaliConfig.vision_towers[{name!r}] is a {type(tower).__name__}; "
                       f"known: {[c.__name__ for c in TOWER_CONFIGS]}")
    names.append(name)
  available = [PALI_VIT_TOWER] + names
  if len(set(available)) != len(available):
    raise ValueError(f"PaliConfig.vision_towers names {names} repeat a name or use "
                     f"{PALI_VIT_TOWER!r}, the PaLI ViT's")
  unused = sorted(set(available) - set(config.move.tower_names))
  unknown = sorted(set(config.move.tower_names) - set(available))
  if unused or unknown:
    raise ValueError(
        f"MoVEConfig.tower_names={tuple(config.move.tower_names)!r} must name every tower "
        f"{available} once: unused {unused}, unknown {unknown}")


# ----------------------------------------------------------------------------- named sizes
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


def _mome(base: PaliConfig, towers, move: MoVEConfig, mole: BottleneckMoLEConfig
          ) -> PaliConfig:
  return dataclasses.replace(base, text=dataclasses.replace(base.text, mome_mole=mole),
                             move=move, vision_towers=towers)


# The MoME sizes. `tiny_mome` is for unit tests (every width distinct): the tiny ViT and a
# Pix2Struct-like tower, two ADTs only, since each ADT costs seconds of compile in every
# test (tests/test_mome_model.py checks the other towers' closed forms on their own).
# `mini_mome` is the CPU demo's (the PaLI ViT, a DINOv2-like and a Pix2Struct-like tower);
# `pali3_mome` the paper-like scale that accounting counts without allocating (DINOv2-L/14,
# a CLIP-L/14 stand-in for EVA-CLIP with its last layer dropped, Pix2Struct-base).
CONFIGS.update({
    "tiny_mome": _mome(
        CONFIGS["tiny"],
        (("pix2struct", Pix2StructVisionConfig(width=20, depth=1, mlp_dim=36, num_heads=2,
                                               head_dim=6, patch_size=4, num_positions=32,
                                               max_patches=16)),),
        MoVEConfig(tower_names=("img", "pix2struct"), width=24, router_hidden_dim=12,
                   adt=ADTConfig(num_queries=4, num_layers=1, num_heads=2, num_points=2,
                                 mlp_ratio=2)),
        BottleneckMoLEConfig(num_experts=3, bottleneck_dim=4, router_hidden_dim=10)),
    "mini_mome": _mome(
        CONFIGS["mini"],
        (("dinov2", DinoV2Config(width=128, depth=2, mlp_dim=256, num_heads=4, patch_size=4,
                                 image_size=32)),
         ("pix2struct", Pix2StructVisionConfig(width=128, depth=2, mlp_dim=256, num_heads=4,
                                               head_dim=32, patch_size=4, num_positions=128,
                                               max_patches=64))),
        MoVEConfig(tower_names=("img", "dinov2", "pix2struct"), width=128,
                   adt=ADTConfig(num_queries=16, num_layers=2, num_heads=8, num_points=4)),
        BottleneckMoLEConfig(num_experts=4, bottleneck_dim=16)),
    "pali3_mome": _mome(
        CONFIGS["pali3"],
        (("clip", ClipVisionConfig(width=1024, depth=23, mlp_dim=4096, num_heads=16,
                                   patch_size=14, image_size=224, scan_layers=True)),
         ("dinov2", DinoV2Config(width=1024, depth=24, mlp_dim=4096, num_heads=16,
                                 patch_size=14, image_size=518, scan_layers=True)),
         ("pix2struct", Pix2StructVisionConfig(width=768, depth=12, mlp_dim=2048,
                                               num_heads=12, head_dim=64, patch_size=16,
                                               num_positions=4096, max_patches=2048,
                                               scan_layers=True))),
        MoVEConfig(tower_names=("img", "clip", "dinov2", "pix2struct"), width=1664),
        BottleneckMoLEConfig()),
})
