"""The training input pipeline: a seqio mixture or task, batched per host, resumable.

    train.train_dataset_cfg = @train/DatasetConfig()
    train/DatasetConfig.mixture_or_task_name = %MIXTURE_OR_TASK_NAME
    train/DatasetConfig.task_feature_lengths = %TASK_FEATURE_LENGTHS
    train/DatasetConfig.batch_size = %BATCH_SIZE          # global, over all hosts
    train/DatasetConfig.seed = %RANDOM_SEED

The pipeline is deterministic for a fixed seed (seqio's shuffle and mixing, and
our preprocessors' stateless sampling, all derive from it). A checkpoint saves
where each host's iterator stands (`iterator_state.py`: tf.data's own iterator
checkpoint) and the position, the batches consumed with what defines the
pipeline. A resumed run restores the iterator and continues mid-epoch, in time
that does not grow with the position (`resume`). When it cannot (no state, or
the state of another pipeline), it rebuilds the pipeline and skips the
consumed batches, with a warning naming why: that also yields exactly the
examples an uninterrupted run would see, but pulls each consumed batch through
the pipeline again. The order of the examples is the mixture's for the seed,
whatever the host count: each host keeps every n-th example of that one global
stream and yields its rows of the global batch, which `Partitioner.global_batch`
assembles, so global batch k holds the same examples on any number of hosts and
a run resumed on another host count continues at the same global position
(DESIGN.md, "Elastic restore").
"""
import importlib
import json
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Union

from absl import logging
import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from omni_smola.data import PaliFeatureConverter
from omni_smola.models.pix2struct_patches import Pix2StructPatching
from omni_smola.training import iterator_state

# What a checkpoint's position records about the pipeline. A change of these changes
# which examples come in which order (neither a saved state nor a skip replays the run):
ORDER_FIELDS = ("mixture_or_task_name", "split", "batch_size", "seed")
# ... of these, the batches' shapes only (a skip still replays the examples) ...
SHAPE_FIELDS = ("task_feature_lengths", "image_size", "pix2struct_patching")
# ... and of these, which host reads which rows: the saved per-host iterator states no
# longer apply, but a skip continues the same global order (`model_dataset`).
HOST_FIELDS = ("process_count",)


@gin.configurable
class DatasetConfig:
  """What to read, t5x's `DatasetConfig` fields.

  Args:
    mixture_or_task_name: a registered seqio task or mixture.
    task_feature_lengths: {'inputs': L_in, 'targets': L_out}.
    split: the split to read.
    batch_size: the global batch size (all hosts together).
    shuffle: shuffle (training) or keep the order (evaluation).
    seed: the pipeline's seed; None is not reproducible (nor resumable).
    use_cached: read seqio's offline cache.
    module: module(s) to import first, registering the tasks (MIXTURE_OR_TASK_MODULE).
  """

  def __init__(self, mixture_or_task_name: str,
               task_feature_lengths: Optional[Mapping[str, int]] = None,
               split: str = "train", batch_size: int = 32, shuffle: bool = True,
               seed: Optional[int] = 0, use_cached: bool = False,
               module: Union[str, Sequence[str], None] = None):
    self.mixture_or_task_name = mixture_or_task_name
    self.task_feature_lengths = dict(task_feature_lengths or {})
    self.split = split
    self.batch_size = batch_size
    self.shuffle = shuffle
    self.seed = seed
    self.use_cached = use_cached
    self.module = module


class UnknownTaskError(ValueError):
  """A task or mixture name nothing registered; the message lists what is."""


def import_task_modules(module: Union[str, Sequence[str], None]) -> None:
  modules = [module] if isinstance(module, str) else list(module or ())
  for name in modules:
    importlib.import_module(name)


def check_registered(name: str, module: Union[str, Sequence[str], None] = None) -> None:
  """Imports `module` and raises UnknownTaskError unless `name` is registered."""
  import_task_modules(module)
  tasks = sorted(seqio.TaskRegistry.names())
  mixtures = sorted(seqio.MixtureRegistry.names())
  if name in tasks or name in mixtures:
    return
  raise UnknownTaskError(
      f"no seqio task or mixture is registered as {name!r} (MIXTURE_OR_TASK_NAME; "
      f"registering module: {module!r}).\n  Registered mixtures: {', '.join(mixtures)}"
      f"\n  Registered tasks: {', '.join(tasks)}")


def check_batch_size(batch_size: int, data_parallel_size: int) -> int:
  """This host's rows of the global batch; errors name the numbers that do not divide."""
  if batch_size % jax.process_count():
    raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  if batch_size % data_parallel_size:
    raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by the data-parallel mesh "
                     f"size {data_parallel_size}")
  return batch_size // jax.process_count()


def model_dataset(cfg: DatasetConfig, image_size: int, *, num_epochs: Optional[int] = None,
                  shard: bool = True, examples_to_skip: int = 0,
                  pix2struct_patching: Optional[Pix2StructPatching] = None) -> tf.data.Dataset:
  """The converted (unbatched) model-feature dataset of this host's rows.

  Every host builds the same global stream of task examples (a function of the
  seed: reading, shuffling, mixing, tokenizing) and, with `shard`, host i of n
  keeps its examples i, i + n, ..., before the feature converter decodes any
  image. With a batch divisible by n, host i's local batch k is then rows i,
  i + n, ... of global batch k, whatever n is. That is what makes the host count
  elastic; it costs each host the reading and tokenizing of every example, which
  `seqio.ShardInfo` at the source would divide by n but tie the order to n.
  `examples_to_skip` skips global examples, before any host's share and decoding.
  `pix2struct_patching` (`PaliConfig.pix2struct_patching`) adds a Pix2Struct tower's
  patches, cut from the unsquashed images (`data.pix2struct_inputs`).
  """
  dataset = seqio.get_mixture_or_task(cfg.mixture_or_task_name).get_dataset(
      cfg.task_feature_lengths, split=cfg.split, use_cached=cfg.use_cached,
      shuffle=cfg.shuffle, seed=cfg.seed, num_epochs=num_epochs)
  if examples_to_skip:
    dataset = dataset.skip(examples_to_skip)
  if shard and jax.process_count() > 1:
    dataset = dataset.shard(jax.process_count(), jax.process_index())
  return PaliFeatureConverter(image_size=image_size, pix2struct_patching=pix2struct_patching)(
      dataset, task_feature_lengths=cfg.task_feature_lengths)


class TrainBatches(Iterator[Dict[str, np.ndarray]]):
  """This host's training batches, endlessly, starting after `batches_to_skip`."""

  def __init__(self, cfg: DatasetConfig, image_size: int, data_parallel_size: int,
               batches_to_skip: int = 0, *,
               pix2struct_patching: Optional[Pix2StructPatching] = None):
    if cfg.seed is None:
      logging.warning("DatasetConfig.seed is None: the input order is not reproducible "
                      "and a resumed run will not see the examples it would have seen")
    self.cfg = cfg
    self.image_size = image_size
    self.pix2struct_patching = pix2struct_patching
    self.local_batch_size = check_batch_size(cfg.batch_size, data_parallel_size)
    if batches_to_skip:
      logging.info("Skipping the %d batches the restored run already consumed",
                   batches_to_skip)
    # `batches_to_skip` counts global batches: skip their examples in the global order.
    dataset = model_dataset(cfg, image_size, examples_to_skip=batches_to_skip * cfg.batch_size,
                            pix2struct_patching=pix2struct_patching
                            ).batch(self.local_batch_size, drop_remainder=True)
    options = tf.data.Options()
    # Checkpointing an iterator refuses stateful functions by default. Ours are the
    # `tf.py_function`s of data/images.py, which decode or check one image and keep
    # nothing between elements: there is no state to lose.
    options.experimental_external_state_policy = (
        tf.data.experimental.ExternalStatePolicy.IGNORE)
    dataset = dataset.prefetch(tf.data.AUTOTUNE).with_options(options)
    self._iterator = dataset.as_numpy_iterator()
    self.batches_consumed = batches_to_skip
    # How this iterator got to its position: "start", "skip" or "state" (restored).
    self.resumed_from = "skip" if batches_to_skip else "start"

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = next(self._iterator)
    self.batches_consumed += 1
    return batch

  @property
  def checkpointable(self):
    """The tf.data iterator, for `tf.train.Checkpoint` (`iterator_state.serialize`)."""
    return self._iterator

  def restore(self, prefix: str, batches_consumed: int) -> None:
    """Continues where the iterator saved under `prefix` stopped (same pipeline)."""
    iterator_state.restore(self._iterator, prefix)
    self.batches_consumed = batches_consumed
    self.resumed_from = "state"

  def position(self) -> Dict[str, object]:
    """What a checkpoint records to resume here (with the iterator's state)."""
    return {"batches_consumed": self.batches_consumed,
            **_now(self.cfg, self.image_size, self.pix2struct_patching)}


def _now(cfg: DatasetConfig, image_size: int,
         pix2struct_patching: Optional[Pix2StructPatching] = None) -> Dict[str, object]:
  """The pipeline's fields as a position records them (JSON types)."""
  return json.loads(json.dumps({
      "mixture_or_task_name": cfg.mixture_or_task_name, "split": cfg.split,
      "batch_size": cfg.batch_size, "seed": cfg.seed, "process_count": jax.process_count(),
      "task_feature_lengths": dict(cfg.task_feature_lengths), "image_size": image_size,
      "pix2struct_patching": pix2struct_patching}))


# Fields newer than some checkpoints, with the value their pipelines had.
UNRECORDED_DEFAULTS = {"pix2struct_patching": None}


def pipeline_changes(position: Mapping[str, object], cfg: DatasetConfig, image_size: int,
                     fields: Sequence[str], *, unrecorded_changed: bool,
                     pix2struct_patching: Optional[Pix2StructPatching] = None) -> List[str]:
  """'field: saved -> now' for each of `fields` that differs from the checkpoint's."""
  now = _now(cfg, image_size, pix2struct_patching)
  position = {**UNRECORDED_DEFAULTS, **position}
  changes = []
  for field in fields:
    if field not in position:
      if unrecorded_changed:
        changes.append(f"{field}: not recorded -> {now[field]!r}")
    elif position[field] != now[field]:
      changes.append(f"{field}: {position[field]!r} -> {now[field]!r}")
  return changes


def batches_to_skip(position: Mapping[str, object], cfg: DatasetConfig) -> int:
  """The batches a restored run skips; warns when the pipeline is not the saved one."""
  consumed = int(position.get("batches_consumed", 0))
  changed = pipeline_changes(position, cfg, 0, ORDER_FIELDS, unrecorded_changed=False)
  if changed:
    logging.warning("The input pipeline changed since the checkpoint (%s): skipping %d "
                    "batches of the new one does not replay the old order",
                    "; ".join(changed), consumed)
  return consumed


def resume(cfg: DatasetConfig, image_size: int, data_parallel_size: int,
           position: Mapping[str, object], state_prefix: Optional[str],
           missing_reason: Optional[str] = None, *,
           pix2struct_patching: Optional[Pix2StructPatching] = None) -> TrainBatches:
  """This host's batches after a restored checkpoint, from its iterator state if it can.

  Args:
    cfg, image_size, data_parallel_size, pix2struct_patching: the pipeline, as for
      `TrainBatches`.
    position: the checkpoint's `data` item (`TrainBatches.position()`).
    state_prefix, missing_reason: `iterator_state.locate` of the step directory.
  """
  consumed = int(position.get("batches_consumed", 0))
  # Recorded changes first: a state saved by two hosts is "missing" for one, but the
  # host count is the reason. A field the position lacks disqualifies a state too.
  fields = ORDER_FIELDS + SHAPE_FIELDS + HOST_FIELDS
  changed = pipeline_changes(position, cfg, image_size, fields, unrecorded_changed=False,
                             pix2struct_patching=pix2struct_patching)
  if not changed and state_prefix is not None:
    changed = pipeline_changes(position, cfg, image_size, fields, unrecorded_changed=True,
                               pix2struct_patching=pix2struct_patching)
  reason = None
  if changed:
    reason = f"it was saved by another input pipeline ({'; '.join(changed)})"
  elif state_prefix is None:
    reason = missing_reason or "the checkpoint has no input iterator state"
  if reason is None:
    batches = TrainBatches(cfg, image_size, data_parallel_size,
                           pix2struct_patching=pix2struct_patching)
    try:
      batches.restore(state_prefix, consumed)
    except (tf.errors.OpError, AssertionError, ValueError) as e:
      reason = (f"it could not be restored ({type(e).__name__}: "
                f"{(str(e).splitlines() or [''])[0]})")
    else:
      logging.info("Restored the input iterator's state: continuing after batch %d "
                   "without replaying", consumed)
      return batches
  logging.warning("Not restoring the input iterator's state: %s. Skipping the %d consumed "
                  "batches instead, which pulls each of them through the pipeline again",
                  reason, consumed)
  return TrainBatches(cfg, image_size, data_parallel_size,
                      batches_to_skip=batches_to_skip(position, cfg),
                      pix2struct_patching=pix2struct_patching)
