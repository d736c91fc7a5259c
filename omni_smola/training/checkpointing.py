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
asynchronous (the device-to-host copy blocks, the writing does not); a write
that fails (disk full, permissions) stops the run with `CheckpointWriteError`
naming the step and the last complete checkpoint, which stays as it was.

A resume reads the latest step that restores (`restore_latest_readable`): a
step whose files are missing or cut short is renamed `<step>.unreadable` (kept
for inspection, never deleted) with a warning naming it, and the step before
is tried; when none restores, the run stops rather than start from scratch.

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
import jax
from jax.experimental import multihost_utils
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
UNREADABLE_SUFFIX = ".unreadable"


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed; the earlier complete ones are untouched."""


class UnreadableCheckpointError(RuntimeError):
  """No checkpoint of a run can be read (each was set aside, named in the message)."""


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
  return traverse_util.unflatten_dict({k: v for k, v in flat.items()
                                       if param_layout.is_adapter_path(k)})


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


def standard_save(tree) -> ocp.args.StandardSave:
  """Orbax's save of `tree`: with one process, of its host copy.

  Orbax writes host arrays at a third of the cost of `jax.Array`s, whose per-array work
  (transfer scheduling, replica slices, sharding metadata) dominates a checkpoint of
  many small arrays: the tiny model's 1,534-leaf state, 2.6 s as arrays on the device,
  1.0 s as host copies. A restore lays either out on its target's shardings. With several
  processes no process holds every shard: each writes its own from the `jax.Array`s.
  """
  return ocp.args.StandardSave(tree if jax.process_count() > 1 else jax.device_get(tree))


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
    self._pending_step: Optional[int] = None  # an asynchronous save still writing
    self._failed = False

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
    self._finish_pending()
    if step in self.manager.all_steps():
      return
    try:
      self._save(step, state_tree, data_position, params, data_iterator)
    except Exception as error:  # whatever the storage raised: say which step and what is safe
      raise self._write_error(step, error) from error
    self._pending_step = step if self.config.use_async else None
    logging.info("Saving checkpoint for step %d to %s", step, self.directory)

  def _save(self, step, state_tree, data_position, params, data_iterator) -> None:
    items = {STATE_ITEM: standard_save(state_tree),
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
        if step in self._adapters_manager.all_steps():
          # Exported before the run died and was resumed from an earlier step: replaced by
          # this run's, so adapters/<step> is always the checkpoint of the same step.
          self._adapters_manager.delete(step)
        self._adapters_manager.save(step, args=ocp.args.Composite(**{
            ADAPTERS_ITEM: standard_save({"params": adapters})}), force=True)

  def _finish_pending(self) -> None:
    """Waits for the background write of the last save; its failure raises, naming it."""
    step, self._pending_step = self._pending_step, None
    try:
      for manager in (self._manager, self._adapters_manager):
        if manager is not None:
          manager.wait_until_finished()
          manager.check_for_errors()
    except Exception as error:  # pylint: disable=broad-except
      raise self._write_error(step, error) from error

  def _write_error(self, step: Optional[int], error: BaseException) -> CheckpointWriteError:
    self._failed = True
    complete = [s for s, _ in _step_dirs(self.directory) if s != step]
    kept = (f"the last complete checkpoint, step {complete[-1]} in {self.directory}, is intact "
            "and a relaunch resumes from it" if complete else
            f"no complete checkpoint is in {self.directory} yet")
    return CheckpointWriteError(
        f"writing the checkpoint of step {step} to {self.directory} failed "
        f"({type(error).__name__}: {error}); the run stops: {kept}. Free space or fix the "
        "storage, then relaunch.")

  def restore(self, step: int, abstract_state: Mapping[str, Any]
              ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(state tree, data position) of `step`, placed with `abstract_state`'s shardings."""
    self._check_fits(step, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract_state),
        DATA_ITEM: ocp.args.JsonRestore()}))
    return restored[STATE_ITEM], dict(restored[DATA_ITEM] or {})

  def restore_latest_readable(self, abstract_state: Mapping[str, Any]
                              ) -> Tuple[int, Dict[str, Any], Dict[str, Any]]:
    """(step, state tree, data position) of the latest step that restores.

    A step that fails to read (a file removed, bytes cut) is renamed
    `<step>.unreadable` beside the others, with a warning naming it, and the step
    before it is tried: the next save of that step number cannot collide with it,
    and nothing the user had is deleted. A checkpoint of another model or adapter
    config raises `CheckpointMismatchError` at once (the earlier steps would not
    fit either). When no step restores, `UnreadableCheckpointError` names them all:
    starting from scratch over a run's checkpoints is never silent.
    """
    unreadable = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, position = self.restore(step, abstract_state)
      except CheckpointMismatchError:
        raise
      except Exception as error:  # pylint: disable=broad-except  # any reader's failure
        reason = f"{type(error).__name__}: {_first_line(error)}"
        moved = self._set_aside(step)
        logging.warning("The checkpoint of step %d in %s cannot be read (%s); moved it to %s "
                        "and trying the previous one", step, self.directory, reason, moved)
        unreadable.append(f"step {step} ({reason}), now {moved}")
        continue
      if unreadable:
        logging.warning("Resuming from step %d: the later checkpoint could not be read: %s",
                        step, "; ".join(unreadable))
      return step, state, position
    raise UnreadableCheckpointError(
        f"no checkpoint in {self.directory} can be read: " + "; ".join(unreadable)
        + ". Not starting from scratch over them: move MODEL_DIR aside to start a new run.")

  def _set_aside(self, step: int) -> str:
    """Renames the step directory `<step>.unreadable` (numbered if taken); returns it."""
    source = os.path.join(self.directory, str(step))
    target = source + UNREADABLE_SUFFIX
    if jax.process_index() == 0:
      number = 1
      while os.path.exists(target):
        number += 1
        target = f"{source}{UNREADABLE_SUFFIX}.{number}"
      os.rename(source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside unreadable checkpoint {step}")
    self.manager.reload()
    return target

  def data_iterator_state(self, step: int) -> Tuple[Optional[str], Optional[str]]:
    """(this process's iterator state prefix in `step`, None), or (None, why none)."""
    return iterator_state.locate(os.path.join(self.directory, str(step)))

  def _check_fits(self, step: int, abstract_state: Mapping[str, Any]) -> None:
    """Names every parameter whose saved shape differs (Orbax's own error does not)."""
    metadata = self.manager.item_metadata(step)[STATE_ITEM]
    tree = getattr(metadata, "tree", metadata)
    if tree is None:
      raise UnreadableCheckpointError(f"{self.directory}/{step} has no readable `{STATE_ITEM}`")
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
    self._finish_pending()

  def close(self) -> None:
    """Finishes the last save (raising `CheckpointWriteError` if it failed) and closes.

    After a failure already raised, closing only releases the managers.
    """
    try:
      if not self._failed:
        self._finish_pending()
    finally:
      for manager in (self._manager, self._adapters_manager):
        if manager is not None:
          try:
            manager.close()
          except Exception as error:  # pylint: disable=broad-except
            if not self._failed:
              raise self._write_error(self._pending_step, error) from error
      self._manager = self._adapters_manager = None


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else repr(error)


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
                   check_loaded: Optional[Callable[[Mapping[str, Any]], None]] = None,
                   adapt_loaded: Optional[Callable[[Mapping[str, Any]], Mapping[str, Any]]]
                   = None,
                   ) -> Dict[str, Any]:
  """`target` (params, concrete or abstract with shardings) filled from a checkpoint.

  Parameters the checkpoint lacks keep `target`'s values when they are adapters
  (fresh adapters on a pretrained backbone) or match `allow_missing`; any other
  gap, a shape mismatch, or an array the model has no place for raises
  `CheckpointMismatchError` naming the parameter and both shapes. With
  `require_adapters` (evaluating a trained model), missing adapters are errors.
  An abstract `target` takes what the checkpoint lacks from `init_fn()`, called
  only after every check passed (so a mismatch costs no initialisation).
  `check_loaded(loaded)` sees the checkpoint's `{path: array}` before any merge (the
  trainer's check that it fills every frozen vision tower). `adapt_loaded(loaded)`
  returns what is matched against `target` instead (MoME's stage 2 copies a single MoLE
  adapter into every expert: `checkpoints.mole_stage_two`).
  """
  path = resolve_checkpoint(path)
  loaded = checkpoint_restore.read_checkpoint(path, format)
  if check_loaded is not None:
    check_loaded(loaded)
  if adapt_loaded is not None:
    loaded = adapt_loaded(loaded)
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
