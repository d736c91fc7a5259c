"""MoME's mixture of vision experts (MoVE): several towers' feature maps -> one set of tokens.

    F = sum_i G(I)_i * T_i(f_i)            f_i: [b, h_i, w_i, d_i] -> F: [b, L, width]

`T_i` turns tower i's feature map into L tokens at the common `width` (`ADT`, or the
ablation's `AveragePool`); `G` weighs the towers per example from the instruction
embedding `I` alone (`InstructionRouter`, or the ablation's `EqualWeights`, a plain
sum). Both are named in `MoVEConfig` and looked up in the tables below, so gin
switches them (`MoVEConfig.transform = 'average_pool'`). F then goes through the
projection into the text encoder (`models.pali.Pali` with `PaliConfig.move`).

Returns `(F, {"tower_weights": [b, towers]})`, the named intermediate for analysis.
"""
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn

from omni_smola.models.adt import ADT, AveragePool
from omni_smola.models.configs import MoVEConfig
from omni_smola.nn import NO_ADAPTERS
from omni_smola.nn.instruction_router import EqualWeights, InstructionRouter

# Keyed by the names `MoVEConfig` validates, `configs.MOVE_TRANSFORMS` and `MOVE_FUSIONS`
# (tests/test_mome_model.py keeps them equal).
TRANSFORMS: Dict[str, Any] = {"adt": ADT, "average_pool": AveragePool}
FUSIONS: Dict[str, Any] = {
    "router": lambda cfg, name: InstructionRouter(len(cfg.tower_names),
                                                  cfg.router_hidden_dim, name=name),
    "addition": lambda cfg, name: EqualWeights(len(cfg.tower_names), name=name),
}


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
