"""The best checkpoint of a run, by average validation score.

The Omni-SMoLA paper selects a generalist's checkpoint by its average validation
score over the tasks. After every in-training evaluation the trainer offers the
results here; the score is the mean over tasks of each task's main metric
(`tables.main_metric`, the number the result tables show). A strictly better
score than every earlier one is kept under MODEL_DIR:

    best/<step>/state/   as checkpoints/<step>/: parameters, optimizer state, step
    best/<step>/data/    the input position (copied into checkpoints/, a run
                         resumes from the best)
    best/best.json       {"step", "score", "tasks": {task: {"metric", "value"}}}

`best/` is a directory of its own, not Orbax's metric-based retention inside
`checkpoints/`: with `best_fn`, Orbax's `max_to_keep` keeps the N best instead
of the N latest, so the latest checkpoint (what a resumed run needs) could be
deleted, and metrics must be given at save time while we evaluate at other
steps than we checkpoint.

Writes happen in an order that a crash at any point leaves consistent:
1. the state is saved to `best/<step>/` (Orbax: a temporary directory, renamed
   when complete);
2. `best.json` is replaced (temp file + `os.replace`): this is the commit;
3. the previous best's directory is deleted.
A keeper opened on an existing MODEL_DIR (a resumed run) reads `best.json`, so a
worse score never replaces a better earlier best, and deletes any `best/<step>/`
the record does not name (an uncommitted save, or a previous best whose
deletion was cut short). Until then, `best/` may hold two steps after a crash:
`best.json` names the committed one (`resolve_checkpoint` takes the later).
"""
import dataclasses
import json
import math
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from absl import logging
import jax
import orbax.checkpoint as ocp

from omni_smola.evaluation import tables
from omni_smola.training import checkpointing

BEST_SUBDIR = "best"
RECORD_FILE = "best.json"

Results = Mapping[str, Mapping[str, float]]  # {task: {metric: value}}


def validation_score(results: Results) -> Tuple[Optional[float], Dict[str, Dict[str, Any]]]:
  """(mean over tasks of their main metric, {task: {"metric", "value"}}).

  Tasks without metrics are left out; the score is None when no task has one.
  """
  tasks = {}
  for task, metrics in sorted(results.items()):
    if metrics:
      name = tables.main_metric(metrics)
      tasks[task] = {"metric": name, "value": float(metrics[name])}
  if not tasks:
    return None, tasks
  return sum(t["value"] for t in tasks.values()) / len(tasks), tasks


@dataclasses.dataclass
class BestRecord:
  """What `best.json` holds: the kept step, its score and each task's main metric."""
  step: int
  score: float
  tasks: Dict[str, Dict[str, Any]]


def read_record(model_dir: str) -> Optional[BestRecord]:
  """The committed best of a run (None when it has none)."""
  path = os.path.join(model_dir, BEST_SUBDIR, RECORD_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    content = json.load(f)
  return BestRecord(int(content["step"]), float(content["score"]), dict(content["tasks"]))


def _write_record(path: str, record: BestRecord) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(dataclasses.asdict(record), f, indent=1, sort_keys=True)
  os.replace(tmp, path)


class BestCheckpointKeeper:
  """Keeps MODEL_DIR/best/ at the best average validation score seen so far.

  Every process calls `offer` with the same results (Orbax saves collectively);
  only the first process writes `best.json`.
  """

  def __init__(self, model_dir: str):
    self.directory = os.path.join(model_dir, BEST_SUBDIR)
    self.record_path = os.path.join(self.directory, RECORD_FILE)
    self.record = read_record(model_dir)
    self._manager: Optional[ocp.CheckpointManager] = None
    leftovers = []
    if os.path.isdir(self.directory):  # nothing is created before the first best
      leftovers = [step for step in self.manager.all_steps()
                   if self.record is None or step != self.record.step]
    for step in leftovers:
      logging.info("Deleting %s/%d: not the recorded best", self.directory, step)
      self.manager.delete(step)
    if self.record is not None:
      logging.info("Best so far: step %d, average validation score %.2f (%s)",
                   self.record.step, self.record.score, self.record_path)

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                               enable_async_checkpointing=False),
          item_handlers={checkpointing.STATE_ITEM: ocp.StandardCheckpointHandler(),
                         checkpointing.DATA_ITEM: ocp.JsonCheckpointHandler()})
    return self._manager

  def offer(self, step: int, results: Results,
            state_tree: Callable[[], Mapping[str, Any]],
            data_position: Mapping[str, Any]) -> bool:
    """Keeps the state of `step` if its results beat the best so far; True if kept.

    `state_tree` is called only then (`TrainState.to_checkpoint`). A tie keeps
    the earlier step; a non-finite score is never kept.
    """
    score, tasks = validation_score(results)
    if score is None or not math.isfinite(score):
      return False
    previous = self.record
    if previous is not None and (score <= previous.score or step == previous.step):
      return False
    self.manager.save(step, args=ocp.args.Composite(**{
        checkpointing.STATE_ITEM: checkpointing.standard_save(state_tree()),
        checkpointing.DATA_ITEM: ocp.args.JsonSave(dict(data_position))}), force=True)
    self.manager.wait_until_finished()
    record = BestRecord(step, score, tasks)
    if jax.process_index() == 0:
      _write_record(self.record_path, record)
    self.record = record
    if previous is not None and previous.step in self.manager.all_steps():
      self.manager.delete(previous.step)
    logging.info("New best checkpoint: step %d, average validation score %.2f over %d tasks "
                 "(before: %s), kept in %s/%d", step, score, len(tasks),
                 "none" if previous is None else f"{previous.score:.2f} at step {previous.step}",
                 self.directory, step)
    return True

  def close(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None


def keeper_for_run(model_dir: str, keep_best: bool, eval_period: int,
                   evaluates_tasks: bool) -> Optional[BestCheckpointKeeper]:
  """A keeper when the run keeps its best and evaluates, else None.

  keep_best with no evaluation (EVAL_PERIOD 0, or no infer_eval_dataset_cfg) is
  not an error: runs that evaluate only after training (the demo, pretraining)
  are common, and failing them for a default would surprise a t5x user. It logs
  one warning naming both settings, as nothing selects a best checkpoint then.
  """
  if not keep_best:
    return None
  if not eval_period or not evaluates_tasks:
    logging.warning(
        "CheckpointConfig.keep_best is on but this run never evaluates (eval_period=%s, "
        "infer_eval_dataset_cfg %s): no best checkpoint will be kept. Set EVAL_PERIOD > 0 "
        "with an infer_eval_dataset_cfg to keep one, or CheckpointConfig.keep_best = False.",
        eval_period, "set" if evaluates_tasks else "None")
    return None
  return BestCheckpointKeeper(model_dir)
