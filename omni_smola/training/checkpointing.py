"""Orbax checkpoints of a run: periodic, keep-N, async, atomic, resumable.

Layout under MODEL_DIR:

    checkpoints/<step>/state/   every parameter, the optimizer state, the step
                                (an Orbax PyTree; `params` is what other readers use)
    checkpoints/<step>/data/    JSON: how many batches the input pipeline consumed,
                                and what defines the pipeline (task, batch, seed, hosts)
    checkpoints/<step>/data_iterator/process_<i>-of-<n>.*
                                each process's tf.data iterator state
                                (`iterator_state.py`; a resume continues from it)
    adapters/<step>/adapters/   the adapter parameters only, `{'params': ...}`
    best/<step>/, best/best.json
                                the best checkpoint by average validation score
                                and its record (`best_checkpoint.py`)

Orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact. Saves are
asynchronous (the device-to-host copy blocks, the writing does not).

`resolve_checkpoint` turns what users pass as a checkpoint (a MODEL_DIR, its
`checkpoints/` or `best/` directory or one step directory) into a step directory;
`restore_params` reads parameters from it, or from any format
`omni_smola.checkpoints.load_pretrained` reads (HF safetensors, T5X, big_vision).
"""
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import gin
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from omni_smola import param_layout
from omni_smola.checkpoints import restore as checkpoint_restore
from omni_smola.checkpoints.restore import CheckpointMismatchError
from omni_smola.training import iterator_state

CHECKPOINTS_SUBDIR = "checkpoints"
ADAPTERS_SUBDIR = "adapters"
STATE_ITEM = "state"
DATA_ITEM = "data"
ADAPTERS_ITEM = "adapters"
DATA_ITERATOR_ITEM = iterator_state.DATA_ITERATOR_ITEM


@gin.configurable
class CheckpointConfig:
  """When and how a run checkpoints.

  Args:
    period: save every `period` steps (and always at the end and on preemption).
    keep: how many recent checkpoints to keep (None: all).
    use_async: write in a background thread.
    export_adapters: also save the adapter parameters alone under `adapters/`.
    keep_best: after each in-training evaluation, keep the checkpoint with the
      best average validation score so far under `best/`, outside `keep`'s
      count (`omni_smola.training.best_checkpoint`; the paper's selection). A
      run that never evaluates keeps none and says so once.
    save_data_iterator: save each host's input iterator state, so a resumed run
      continues without replaying the consumed batches. The state holds the
      shuffle buffers' encoded examples (DESIGN.md, "Resuming the input"); False
      saves space and resumes by skipping, as before.
  """

  def __init__(self, period: int = 1000, keep: Optional[int] = 3, use_async: bool = True,
               export_adapters: bool = True, keep_best: bool = True,
               save_data_iterator: bool = True):
    if period < 1:
      raise ValueError(f"CheckpointConfig.period must be >= 1, got {period}")
    self.period = period
    self.keep = keep
    self.use_async = use_async
    self.export_adapters = export_adapters
    self.keep_best = keep_best
    self.save_data_iterator = save_data_iterator


def adapter_params(params: Mapping[str, Any]) -> Dict[str, Any]:
  flat = traverse_util.flatten_dict(dict(params), keep_empty_nodes=False)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if param_layout.is_adapter_path(k)})


def _step_dirs(directory: str) -> List[Tuple[int, str]]:
  """(step, path) of the complete step directories under `directory`, by step."""
  if not os.path.isdir(directory):
    return []
  found = []
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if re.fullmatch(r"\d+", name) and os.path.isdir(path):
      found.append((int(name), path))
  return sorted(found)


class RunCheckpointer:
  """Saves and restores the train state of one run under `model_dir`.

  Nothing is created on disk until the first save, so a run that fails during
  set-up leaves no trace.
  """

  def __init__(self, model_dir: str, config: Optional[CheckpointConfig] = None):
    self.model_dir = model_dir
    self.config = config or CheckpointConfig()
    self.directory = os.path.join(model_dir, CHECKPOINTS_SUBDIR)
    self.adapters_directory = os.path.join(model_dir, ADAPTERS_SUBDIR)
    self._manager: Optional[ocp.CheckpointManager] = None
    self._adapters_manager: Optional[ocp.CheckpointManager] = None

  def _options(self):
    return ocp.CheckpointManagerOptions(
        max_to_keep=self.config.keep, enable_async_checkpointing=self.config.use_async,
        create=True)

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      self._manager = ocp.CheckpointManager(
          self.directory, options=self._options(),
          item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                         DATA_ITEM: ocp.JsonCheckpointHandler(),
                         DATA_ITERATOR_ITEM: iterator_state.DataIteratorHandler()})
    return self._manager

  def latest_step(self) -> Optional[int]:
    if not _step_dirs(self.directory):
      return None
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return step % self.config.period == 0

  def save(self, step: int, state_tree: Mapping[str, Any], data_position: Mapping[str, Any],
           params: Optional[Mapping[str, Any]] = None, data_iterator: Any = None) -> None:
    """Saves `state_tree` (TrainState.to_checkpoint) and the data position at `step`.

    `data_iterator` (`TrainBatches.checkpointable`), when given, is saved in the
    same step, each process its own (unless `config.save_data_iterator` is off).
    """
    if step in self.manager.all_steps():
      return
    items = {STATE_ITEM: ocp.args.StandardSave(state_tree),
             DATA_ITEM: ocp.args.JsonSave(dict(data_position))}
    if data_iterator is not None and self.config.save_data_iterator:
      items[DATA_ITERATOR_ITEM] = iterator_state.DataIteratorSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if self.config.export_adapters and params is not None:
      adapters = adapter_params(params)
      if adapters:
        if self._adapters_manager is None:
          self._adapters_manager = ocp.CheckpointManager(
              self.adapters_directory, options=self._options(),
              item_handlers={ADAPTERS_ITEM: ocp.StandardCheckpointHandler()})
        self._adapters_manager.save(step, args=ocp.args.Composite(**{
            ADAPTERS_ITEM: ocp.args.StandardSave({"params": adapters})}), force=True)
    logging.info("Saving checkpoint for step %d to %s", step, self.directory)

  def restore(self, step: int, abstract_state: Mapping[str, Any]
              ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(state tree, data position) of `step`, placed with `abstract_state`'s shardings."""
    self._check_fits(step, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract_state),
        DATA_ITEM: ocp.args.JsonRestore()}))
    return restored[STATE_ITEM], dict(restored[DATA_ITEM] or {})

  def data_iterator_state(self, step: int) -> Tuple[Optional[str], Optional[str]]:
    """(this process's iterator state prefix in `step`, None), or (None, why none)."""
    return iterator_state.locate(os.path.join(self.directory, str(step)))

  def _check_fits(self, step: int, abstract_state: Mapping[str, Any]) -> None:
    """Names every parameter whose saved shape differs (Orbax's own error does not)."""
    metadata = self.manager.item_metadata(step)[STATE_ITEM]
    tree = getattr(metadata, "tree", metadata)
    if tree is None:
      raise CheckpointMismatchError(f"{self.directory}/{step} has no readable `{STATE_ITEM}`")
    saved = _flat_shapes(tree.get("params", {}) if isinstance(tree, Mapping) else {})
    wanted = _flat_shapes(abstract_state["params"])
    problems = [f"missing: {k} (model shape {wanted[k]}) is not in the checkpoint"
                for k in sorted(set(wanted) - set(saved))]
    problems += [f"shape mismatch: {k}: checkpoint {saved[k]} vs model {wanted[k]}"
                 for k in sorted(set(wanted) & set(saved)) if saved[k] != wanted[k]]
    problems += [f"unexpected: {k} {saved[k]} has no place in the model"
                 for k in sorted(set(saved) - set(wanted))]
    if problems:
      raise CheckpointMismatchError(
          f"the checkpoint of step {step} in {self.directory} does not fit the model "
          "(was it written with another model or adapter config?):\n  "
          + "\n  ".join(problems))

  def wait(self) -> None:
    for manager in (self._manager, self._adapters_manager):
      if manager is not None:
        manager.wait_until_finished()

  def close(self) -> None:
    for manager in (self._manager, self._adapters_manager):
      if manager is not None:
        manager.wait_until_finished()
        manager.close()
    self._manager = self._adapters_manager = None


def _flat_shapes(tree) -> Dict[str, tuple]:
  flat = traverse_util.flatten_dict(dict(tree), keep_empty_nodes=False) if tree else {}
  return {"/".join(map(str, k)): tuple(getattr(v, "shape", np.shape(v)))
          for k, v in flat.items()}


# ---------------------------------------------------------------- reading params


def resolve_checkpoint(path: str) -> str:
  """A checkpoint to read, from a MODEL_DIR, a `checkpoints/` dir or a step dir.

  Other paths (a `.safetensors` file, a T5X checkpoint, ...) are returned as they
  are. Raises FileNotFoundError, naming the path, when there is nothing there.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path does not exist: {path}")
  for directory in (os.path.join(path, CHECKPOINTS_SUBDIR), path):
    steps = _step_dirs(directory)
    if steps and not os.path.exists(os.path.join(path, STATE_ITEM)):
      return steps[-1][1]
  if os.path.isdir(os.path.join(path, CHECKPOINTS_SUBDIR)):
    raise FileNotFoundError(f"{path} has a {CHECKPOINTS_SUBDIR}/ directory but no "
                            "complete checkpoint in it")
  return path


def all_checkpoints(path: str) -> List[Tuple[int, str]]:
  """(step, step dir) of every checkpoint of a MODEL_DIR or `checkpoints/` dir."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path does not exist: {path}")
  for directory in (os.path.join(path, CHECKPOINTS_SUBDIR), path):
    steps = _step_dirs(directory)
    if steps:
      return steps
  return [(step_of(path), path)]


def step_of(path: str) -> int:
  """The step of a step directory (its name), or of a checkpoint's `step` entry; -1 if none."""
  name = os.path.basename(os.path.normpath(path))
  if re.fullmatch(r"\d+", name):
    return int(name)
  return -1


def restore_params(path: str, target: Mapping[str, Any], *,
                   allow_missing: Sequence[str] = (),
                   require_adapters: bool = False,
                   ignore_unexpected: bool = False,
                   init_fn: Optional[Callable[[], Mapping[str, Any]]] = None,
                   frozen: Optional[Callable[[str], bool]] = None,
                   format: str = "auto",  # pylint: disable=redefined-builtin
                   ) -> Dict[str, Any]:
  """`target` (params, concrete or abstract with shardings) filled from a checkpoint.

  Parameters the checkpoint lacks keep `target`'s values when they are adapters
  (fresh adapters on a pretrained backbone) or match `allow_missing`; any other
  gap, a shape mismatch, or an array the model has no place for raises
  `CheckpointMismatchError` naming the parameter and both shapes. With
  `require_adapters` (evaluating a trained model), missing adapters are errors.
  An abstract `target` takes what the checkpoint lacks from `init_fn()`, called
  only after every check passed (so a mismatch costs no initialisation).
  """
  path = resolve_checkpoint(path)
  loaded = checkpoint_restore.read_checkpoint(path, format)
  if require_adapters:
    flat = traverse_util.flatten_dict(dict(target), keep_empty_nodes=False)
    missing = sorted("/".join(k) for k, v in flat.items()
                     if param_layout.is_adapter_path(k) and "/".join(k) not in loaded)
    if missing:
      raise CheckpointMismatchError(
          f"{path} has no values for {len(missing)} adapter parameters of the model, "
          f"e.g. {missing[:3]} (model shape {tuple(flat[tuple(missing[0].split('/'))].shape)}): "
          "was it trained with another adapter config?")
  try:
    return checkpoint_restore.load_pretrained(
        target, loaded, allow_missing=allow_missing, ignore_unexpected=ignore_unexpected,
        init_fn=init_fn, frozen=frozen)
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(str(e).replace("the given arrays", path, 1)) from None
