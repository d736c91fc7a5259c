"""Closed-form parameters and forward FLOPs of a MoME PaLI's parts: towers, ADT, routers, MoLE.

The definition accounting holds the traced model to (`accounting.mome_parts`; a test
compares both on the tiny MoME model), and what `python -m omni_smola.params` prints for
a MoME config at any scale without allocating. Letters: d a tower's width, m its MLP
width, p its patch, W MoVE's common width, L queries, M ADT layers, Nh heads, Np points,
N the cells of a tower's feature map, T tokens, r MoLE's bottleneck, K its experts.

FLOPs follow `omni_smola.accounting`: 2 per multiply-add of the matmuls of one example's
forward pass (pooling means, norms, softmaxes and gathers are free). The towers' own
FLOPs are not here: their projections are traced like the ViT's and counted as vision
backbone. Tests hold these formulas to the `dot_general`s the modules trace.
"""
import math
from typing import Dict, Mapping, Tuple

from omni_smola.models.configs import (PALI_VIT_TOWER, ClipVisionConfig, DinoV2Config,
                                       MoVEConfig, PaliConfig, Pix2StructVisionConfig,
                                       ViTConfig)
from omni_smola.models.pix2struct_patches import canvas_grid


def _layer_norm(d: int) -> int:
  return 2 * d  # scale and bias


def _biased_attention(d: int) -> int:
  return 4 * (d * d + d)  # query, key, value, out; heads x head_dim = d


def _biased_mlp(d: int, m: int) -> int:
  return 2 * d * m + m + d


def _patch_embedding(d: int, patch: int) -> int:
  return patch * patch * 3 * d + d


def siglip_vit(cfg: ViTConfig) -> int:
  block = 2 * _layer_norm(cfg.width) + _biased_attention(cfg.width) + _biased_mlp(
      cfg.width, cfg.mlp_dim)
  return (_patch_embedding(cfg.width, cfg.patch_size) + cfg.num_patches * cfg.width
          + cfg.depth * block + _layer_norm(cfg.width))


def _class_token_vit(cfg, layer_scale: bool) -> int:
  d = cfg.width
  block = (2 * _layer_norm(d) + _biased_attention(d) + _biased_mlp(d, cfg.mlp_dim)
           + (2 * d if layer_scale else 0))
  return (_patch_embedding(d, cfg.patch_size) + d  # class token
          + (1 + cfg.grid_size ** 2) * d + cfg.depth * block)


def dinov2(cfg: DinoV2Config) -> int:
  return (_class_token_vit(cfg, cfg.layer_scale) + cfg.num_register_tokens * cfg.width
          + _layer_norm(cfg.width))  # final norm


def clip_vision(cfg: ClipVisionConfig) -> int:
  return _class_token_vit(cfg, False) + _layer_norm(cfg.width)  # the norm before the blocks


def pix2struct(cfg: Pix2StructVisionConfig) -> int:
  d, inner = cfg.width, cfg.num_heads * cfg.head_dim
  layer = 2 * d + 4 * d * inner + 3 * d * cfg.mlp_dim  # RMSNorms, attention, gated MLP
  return (cfg.patch_dim * d + d + 2 * cfg.num_positions * d + cfg.depth * layer + d)


TOWERS = {ViTConfig: siglip_vit, DinoV2Config: dinov2, ClipVisionConfig: clip_vision,
          Pix2StructVisionConfig: pix2struct}


def deformable_cross_attention(d: int, heads: int, points: int) -> int:
  value = d * d + d
  offsets = d * heads * points * 2 + heads * points * 2
  weights = d * heads * points + heads * points
  out = d * d + d
  return value + offsets + weights + out


def adt(move: MoVEConfig, d: int) -> int:
  cfg = move.adt
  layer = (3 * _layer_norm(d) + _biased_attention(d)
           + deformable_cross_attention(d, cfg.num_heads, cfg.num_points)
           + _biased_mlp(d, cfg.mlp_ratio * d))
  return (cfg.num_queries * d + 2 * cfg.num_queries  # query positions, reference points
          + cfg.num_layers * layer + _layer_norm(d) + d * move.width + move.width)


def average_pool(move: MoVEConfig, d: int) -> int:
  return d * move.width + move.width  # the output projection alone


TRANSFORMS = {"adt": adt, "average_pool": average_pool}


def instruction_router(d_instruction: int, hidden: int, choices: int) -> int:
  return d_instruction * hidden + hidden + hidden * choices + choices


def bottleneck_mole(num_experts: int, bottleneck: int, hidden, d: int) -> int:
  """One MoLE beside one FFN: K x (down, up, their biases, s) and, for K > 1, its router."""
  experts = num_experts * (2 * d * bottleneck + bottleneck + d + 1)
  router = instruction_router(d, hidden or d, num_experts) if num_experts > 1 else 0
  return experts + router


def towers(config: PaliConfig) -> Dict[str, object]:
  """{tower name: its config}: the PaLI ViT (`img`) and `vision_towers`."""
  return {PALI_VIT_TOWER: config.vision, **dict(config.vision_towers)}


def _tower_router(config: PaliConfig, count) -> int:
  """`count(d_instruction, hidden, towers)` of MoVE's router; 0 for plain addition."""
  move, d_instruction = config.move, config.text.emb_dim
  if move.fusion != "router":
    return 0
  return count(d_instruction, move.router_hidden_dim or d_instruction, len(move.tower_names))


def mome_parts(config: PaliConfig) -> Dict[str, int]:
  """{part: parameters} of a MoME PaLI's added parts; {} for a model without them.

  Parts: `tower/<name>` (the PaLI ViT is `tower/img`), `move/transform_<name>`,
  `move/tower_router`, and `mome_mole` (every FFN of the encoder and decoder).
  """
  parts: Dict[str, int] = {}
  move = config.move
  if move is not None:
    configs_by_name = towers(config)
    for name in move.tower_names:
      tower = configs_by_name[name]
      parts[f"tower/{name}"] = TOWERS[type(tower)](tower)
      parts[f"move/transform_{name}"] = TRANSFORMS[move.transform](move, tower.width)
    parts["move/tower_router"] = _tower_router(config, instruction_router)
  mole = config.text.mome_mole
  if mole is not None:
    layers = config.text.num_encoder_layers + config.text.num_decoder_layers
    parts["mome_mole"] = layers * bottleneck_mole(
        mole.num_experts, mole.bottleneck_dim, mole.router_hidden_dim, config.text.emb_dim)
  return parts


# ------------------------------------------------------------------------- FLOPs


def feature_grid(tower, image_size: int) -> Tuple[int, int]:
  """(h, w) of the feature map a tower hands MoVE for a square PaLI image of `image_size`.

  The ViTs' maps are their patch grids at the PaLI resolution; Pix2Struct's is its whole
  canvas (`models.vision_features.scattered_features`), padding included, which the ADT's
  value projection runs over.
  """
  if isinstance(tower, Pix2StructVisionConfig):
    return canvas_grid(tower.max_patches, tower.max_aspect_ratio)
  side = image_size // tower.patch_size
  return side, side


def _attention_flops(queries: int, keys: int, d: int) -> int:
  return 2 * 4 * queries * d * d + 2 * 2 * queries * keys * d  # q, k, v, out; scores, sum


def deformable_cross_attention_flops(d: int, heads: int, points: int, queries: int,
                                     cells: int) -> int:
  """The value projection of every cell, offsets, weights, 4-corner sampling, mixing, out."""
  value = 2 * cells * d * d
  offsets_and_weights = 2 * queries * d * heads * points * 3  # 2 offsets + 1 weight
  sampling = 2 * queries * points * 4 * d  # each head's c = d / Nh channels, 4 corners
  mixing = 2 * queries * points * d
  out = 2 * queries * d * d
  return value + offsets_and_weights + sampling + mixing + out


def adt_flops(move: MoVEConfig, d: int, grid: Tuple[int, int]) -> int:
  cfg, queries = move.adt, move.adt.num_queries
  layer = (_attention_flops(queries, queries, d)
           + deformable_cross_attention_flops(d, cfg.num_heads, cfg.num_points, queries,
                                              math.prod(grid))
           + 2 * 2 * queries * d * cfg.mlp_ratio * d)
  return cfg.num_layers * layer + 2 * queries * d * move.width


def average_pool_flops(move: MoVEConfig, d: int, grid: Tuple[int, int]) -> int:
  del grid  # the pooling means are free
  return 2 * move.adt.num_queries * d * move.width


TRANSFORM_FLOPS = {"adt": adt_flops, "average_pool": average_pool_flops}


def instruction_router_flops(d_instruction: int, hidden: int, choices: int) -> int:
  """Once per example: the instruction embedding (a mean) is free."""
  return 2 * (d_instruction * hidden + hidden * choices)


def bottleneck_mole_flops(num_experts: int, bottleneck: int, hidden, d: int,
                          tokens: int) -> int:
  """One MoLE beside one FFN: the chosen expert's down and up on every token, the router."""
  router = (instruction_router_flops(d, hidden or d, num_experts) if num_experts > 1 else 0)
  return 2 * 2 * tokens * d * bottleneck + router


def mome_flops(config: PaliConfig, tokens: Mapping[str, int]) -> Dict[str, Dict[str, int]]:
  """{stack: {part: forward FLOPs of one example}}; {} for a model without MoME's parts.

  Parts as `mome_parts` (MoLE split by stack); `tokens`: the encoder's and decoder's
  sequence lengths, as `accounting.TokenLayout.length`.
  """
  flops: Dict[str, Dict[str, int]] = {}
  move = config.move
  if move is not None:
    vision = flops.setdefault("vision", {})
    configs_by_name = towers(config)
    for name in move.tower_names:
      tower = configs_by_name[name]
      vision[f"move/transform_{name}"] = TRANSFORM_FLOPS[move.transform](
          move, tower.width, feature_grid(tower, config.vision.image_size))
    vision["move/tower_router"] = _tower_router(config, instruction_router_flops)
  mole = config.text.mome_mole
  if mole is not None:
    for stack, layers in (("encoder", config.text.num_encoder_layers),
                          ("decoder", config.text.num_decoder_layers)):
      flops.setdefault(stack, {})["mome_mole"] = layers * bottleneck_mole_flops(
          mole.num_experts, mole.bottleneck_dim, mole.router_hidden_dim,
          config.text.emb_dim, tokens[stack])
  return flops
