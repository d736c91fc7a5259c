"""MoME's mixture of vision experts (MoVE): several towers' feature maps -> one set of tokens.

    F = sum_i G(I)_i * T_i(f_i)            f_i: [b, h_i, w_i, d_i] -> F: [b, L, width]

`T_i` turns tower i's feature map into L tokens at the common `width` (`ADT`, or the
ablation's `AveragePool`); `G` weighs the towers per example from the instruction
embedding `I` alone (`InstructionRouter`, or the ablation's `EqualWeights`, a plain
sum). Both are named in `MoVEConfig` and looked up in the tables below, so gin
switches them (`MoVEConfig.transform = 'average_pool'`). F then goes through the
projection into the text encoder; wiring this into `models/pali.py` is later work.

Returns `(F, {"tower_weights": [b, towers]})`, the named intermediate for analysis.
"""
import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax.numpy as jnp

from omni_smola.models.adt import ADT, ADTConfig, AveragePool
from omni_smola.nn import NO_ADAPTERS
from omni_smola.nn.instruction_router import EqualWeights, InstructionRouter

TRANSFORMS: Dict[str, Any] = {"adt": ADT, "average_pool": AveragePool}
FUSIONS: Dict[str, Any] = {
    "router": lambda cfg, name: InstructionRouter(len(cfg.tower_names),
                                                  cfg.router_hidden_dim, name=name),
    "addition": lambda cfg, name: EqualWeights(len(cfg.tower_names), name=name),
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MoVEConfig:
  """The MoVE front end.

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
    for field, table in (("transform", TRANSFORMS), ("fusion", FUSIONS)):
      if getattr(self, field) not in table:
        raise ValueError(f"MoVEConfig.{field}={getattr(self, field)!r}; known: {sorted(table)}")
    if self.fusion == "router" and len(self.tower_names) == 1:
      raise ValueError(
          f"MoVEConfig.fusion='router' over one tower {tuple(self.tower_names)!r} always "
          "weighs it 1 and would train nothing: use fusion='addition'")


class MoVE(nn.Module):
  config: MoVEConfig

  @property
  def adapters(self):
    return NO_ADAPTERS  # trained in full: no projection here carries an adapter

  @nn.compact
  def __call__(self, feature_maps: Sequence[Any], instruction,
               valid_masks: Optional[Sequence[Any]] = None):
    """feature_maps: per tower [b, h_i, w_i, d_i]; instruction [b, d_I].

    valid_masks: per tower None or [b, h_i, w_i] bool (Pix2Struct's padded grid).
    """
    cfg = self.config
    towers = tuple(cfg.tower_names)
    valid_masks = [None] * len(towers) if valid_masks is None else list(valid_masks)
    if len(feature_maps) != len(towers) or len(valid_masks) != len(towers):
      raise ValueError(
          f"MoVE: MoVEConfig.tower_names={towers!r} names {len(towers)} towers, got "
          f"{len(feature_maps)} feature maps and {len(valid_masks)} validity masks")
    tower_weights = FUSIONS[cfg.fusion](cfg, "tower_router")(instruction)  # [b, i]
    transform = TRANSFORMS[cfg.transform]
    fused = 0.0
    for i, (tower, features, valid) in enumerate(zip(towers, feature_maps, valid_masks)):
      tokens = transform(cfg.adt, cfg.width, name=f"transform_{tower}")(features, valid)
      fused = fused + tokens * tower_weights[:, i, None, None].astype(tokens.dtype)
    fused = nn.with_logical_constraint(fused, ("batch", "length", "embed"))
    return fused, {"tower_weights": tower_weights}
