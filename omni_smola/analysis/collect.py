"""Running a checkpoint over each task's examples and collecting the sown routing statistics.

The adapters sow per-example statistics (`omni_smola.nn.routing_stats`) when the
`intermediates` collection is mutable; `PaliModel.score_batch(...,
return_intermediates=True)` makes it so. Here they are picked out of the
intermediates by name, inside the jitted function (so nothing else leaves the
device), keyed `'<site>|<group>|<stat>'`, e.g.
`'text/encoder/layers_0/mlp/wi_0|mm|expert_load'` -> [b, experts]. MoME's MoLE sows the
same statistics (`.../layers_0/mome_mole|mome_mole|expert_load`, its one chosen expert per
example), and MoVE's tower router its weights, `tower_weights` -> [b, towers].

Padding never counts: the encoder's adapters get the prompt's padding mask and
the decoder's get `decoder_target_tokens > 0` from the model (teacher forcing),
so the sown sums cover valid tokens only.
"""
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
import seqio
from flax import traverse_util

from omni_smola import param_layout
from omni_smola.nn import AdapterPlan
from omni_smola.training import data_iterator

STATS = ("expert_load", "token_count", "routing_entropy", "max_weight")
TOWER_WEIGHTS = "tower_weights"  # MoVE's [b, towers] router weights, sown by models.pali
ROW_VALID = "analysis_row_valid"  # marks the rows that pad a task's last batch
SEPARATOR = "|"


def stat_key(site: str, group: str, stat: str) -> str:
  return SEPARATOR.join((site, group, stat))


def split_key(key: str) -> Tuple[str, str, str]:
  site, group, stat = key.split(SEPARATOR)
  return site, group, stat


def group_of(key: Sequence[str], plan: AdapterPlan) -> Tuple[str, str]:
  """(site, group) of a sown statistic's path, e.g. (.., 'adapter', 'mm', 'expert_load')."""
  position = param_layout.adapter_position(key, plan)
  if position is None:
    raise ValueError(f"routing statistic outside an adapter: {'/'.join(key)}")
  return position.site, position.component


def routing_statistics(model, params, batch) -> Dict[str, jnp.ndarray]:
  """Per-example routing statistics of one batch, plus `task_id` and the row mask."""
  _, intermediates = model.score_batch(params, batch, return_intermediates=True)
  out = {}
  flat = traverse_util.flatten_dict(intermediates)
  # A scanned stack sowed each statistic with a leading layer axis: one entry per layer.
  for key, value in (entry for item in flat.items() for entry in param_layout.per_layer(*item)):
    if key == (TOWER_WEIGHTS,):  # MoME: once per example, at the model's root
      out[TOWER_WEIGHTS] = value[0] if isinstance(value, tuple) else value
      continue
    if key[-1] not in STATS:
      continue
    site, group = group_of(key[:-1], model.adapters)
    values = value if isinstance(value, tuple) else (value,)
    # A module applied several times sowed several entries: they add up (max for max).
    combined = values[0]
    for more in values[1:]:
      combined = jnp.maximum(combined, more) if key[-1] == "max_weight" else combined + more
    out[stat_key(site, group, key[-1])] = combined
  out["task_id"] = batch["task_id"]
  out[ROW_VALID] = batch[ROW_VALID]
  return out


# ------------------------------------------------------------------------- data


def leaf_tasks(name: str) -> List[str]:
  """The tasks of a mixture (its sub-mixtures' too), or the task itself."""
  provider = seqio.get_mixture_or_task(name)
  if isinstance(provider, seqio.Mixture):
    return [task.name for task in provider.tasks]
  return [provider.name]


def task_config(cfg: data_iterator.DatasetConfig, task: str) -> data_iterator.DatasetConfig:
  return data_iterator.DatasetConfig(
      task, cfg.task_feature_lengths, split=cfg.split, batch_size=cfg.batch_size,
      shuffle=False, seed=cfg.seed, use_cached=cfg.use_cached, module=cfg.module)


def _pad_rows(batch: Dict[str, np.ndarray], rows: int) -> Dict[str, np.ndarray]:
  present = len(next(iter(batch.values())))
  padded = {k: np.concatenate([v, np.zeros((rows - present,) + v.shape[1:], v.dtype)])
            if present < rows else v for k, v in batch.items()}
  padded[ROW_VALID] = (np.arange(rows) < present).astype(np.int32)
  return padded


def task_batches(cfg: data_iterator.DatasetConfig, task: str, image_size: int,
                 num_batches: Optional[int], pix2struct_patching=None
                 ) -> Iterator[Dict[str, np.ndarray]]:
  """Up to `num_batches` batches of `task`, in order, one epoch (one process reads all).

  The last batch is padded to full size; `ROW_VALID` marks the real rows.
  `pix2struct_patching`: as the trainer's pipeline (`PaliConfig.pix2struct_patching`).
  """
  dataset = data_iterator.model_dataset(task_config(cfg, task), image_size, num_epochs=1,
                                        shard=False, pix2struct_patching=pix2struct_patching)
  dataset = dataset.batch(cfg.batch_size, drop_remainder=False)
  if num_batches is not None:
    dataset = dataset.take(num_batches)
  for batch in dataset.as_numpy_iterator():
    yield _pad_rows(batch, cfg.batch_size)
