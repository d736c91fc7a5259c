"""MoME's stage 2 from a run's initial checkpoint: every MoLE expert starts as stage 1's adapter.

MoME trains its language experts in two stages: stage 1 one bottleneck adapter beside each FFN
(`BottleneckMoLEConfig.num_experts = 1`, no router), stage 2 K experts that each start as that
adapter, with a fresh router. A stage-2 run names the stage-1 run as INITIAL_CHECKPOINT_PATH
and sets

    omni_smola.training.trainer.train.mole_experts_from_single_adapter = True

Its MoVE and everything else the checkpoint holds load as usual; each MoLE's expert
parameters (`nn.mome_mole.EXPERT_PARAMS`) are the checkpoint's single expert K times
(`single_expert_broadcast`), so stage 2's model computes stage 1's function at its first
step whatever the router picks (the hard gate is exactly 1). Without the setting, a
single-expert checkpoint into a K-expert model is a shape mismatch (`CheckpointMismatchError`).
"""
import re
from typing import Any, Dict, Mapping

import numpy as np
from flax import traverse_util

from omni_smola.checkpoints.restore import CheckpointMismatchError
from omni_smola.nn.mome_mole import EXPERT_PARAMS, single_expert_broadcast

SETTING = "omni_smola.training.trainer.train.mole_experts_from_single_adapter"
EXPERT_PATH = re.compile(rf"(^|/)mome_mole/({'|'.join(EXPERT_PARAMS)})$")


def check_model(config) -> None:
  """Fails, naming the fields, when the model has no MoLE with experts to fill."""
  mole = getattr(getattr(config, "text", None), "mome_mole", None)
  if mole is None or mole.num_experts < 2:
    raise ValueError(
        f"{SETTING} = True copies a single MoLE adapter into every expert, but the model's "
        f"T5Config.mome_mole is {mole!r}: stage 2 needs BottleneckMoLEConfig.num_experts >= 2")


def experts_from_stage_one(loaded: Mapping[str, Any], target: Mapping[str, Any],
                           checkpoint: str) -> Dict[str, Any]:
  """`loaded` ({path: array}, a stage-1 checkpoint) with its MoLE experts copied K times.

  Args:
    loaded: the checkpoint's parameters, as `checkpoints.restore.read_checkpoint` gives them.
    target: the stage-2 model's (abstract) parameter tree.
    checkpoint: the checkpoint's path, for the errors.
  """
  shapes = {"/".join(k): tuple(v.shape)
            for k, v in traverse_util.flatten_dict(dict(target), keep_empty_nodes=False).items()}
  sites = sorted(name for name in shapes if EXPERT_PATH.search(name))
  if not sites:
    raise ValueError(f"{SETTING} = True, but the model has no MoME MoLE parameters "
                     "(.../mome_mole/down_kernel, ...)")
  missing = [name for name in sites if name not in loaded]
  if missing:
    raise CheckpointMismatchError(
        f"{checkpoint} has no {missing[0]} ({len(missing)} MoLE expert parameters missing): "
        f"{SETTING} starts stage 2 from a stage-1 run, whose MoLE has one expert "
        "(BottleneckMoLEConfig.num_experts = 1)")
  copied = dict(loaded)
  for name in sites:
    try:
      copied[name] = np.array(single_expert_broadcast(name, np.asarray(loaded[name]),
                                                      shapes[name]))
    except ValueError as e:
      raise CheckpointMismatchError(f"{checkpoint}: {e} ({SETTING})") from None
  return copied
