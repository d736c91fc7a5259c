"""The trainer on the tiny config: learning, resuming, preemption, divergence, frozen params."""
import json
import logging
import os
import pathlib
import shutil
import signal
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice_checks"))
import train_common  # noqa: E402

train_common.enable_compilation_cache()

import gin  # noqa: E402
import jax  # noqa: E402

from omni_smola.evaluation import tables  # noqa: E402
from omni_smola.training import data_iterator, faults, iterator_state, trainer  # noqa: E402


from run_fixtures import clean_gin, data_dir, shared_programs  # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="module", autouse=True)
def programs_shared_by_the_module(shared_programs):
  del shared_programs


def train(model_dir, data_dir, callbacks=(), **overrides):
  train_common.configure(str(model_dir), data_dir, **overrides)
  return trainer.train(callbacks=callbacks)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
  """30 steps of the tiny Omni-SMoLA config, checkpoints every 10 (shared by the session)."""
  model_dir, summary = train_common.shared_tiny_run(
      str(tmp_path_factory.getbasetemp().parent), data_dir)
  return pathlib.Path(model_dir), summary


def test_loss_decreases_and_run_directory_has_checkpoints_logs_and_config(tiny_run):
  model_dir, summary = tiny_run
  losses = [loss for _, loss in summary["loss_history"]]
  assert [step for step, _ in summary["loss_history"]] == [5, 10, 15, 20, 25, 30]
  assert losses[-1] < losses[0] - 0.5, losses
  assert sorted(os.listdir(model_dir / "checkpoints")) == ["10", "20", "30"]
  assert (model_dir / "adapters" / "30" / "adapters").is_dir()
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(model_dir / "train"))
  assert "MIXTURE_OR_TASK_NAME = 'mini_trio_tiny'" in (model_dir / "config.gin").read_text()
  assert train_common.read_position(str(model_dir / "checkpoints" / "30")) == {
      "batches_consumed": 30, "mixture_or_task_name": "mini_trio_tiny", "split": "train",
      "batch_size": 8, "seed": 0, "process_count": 1,
      "task_feature_lengths": {"inputs": 16, "targets": 16}, "image_size": 16,
      "pix2struct_patching": None}
  assert sorted(os.listdir(model_dir / "checkpoints" / "30" / "data_iterator")) == [
      "commit_success.txt", "process_0-of-1.data-00000-of-00001", "process_0-of-1.index"]


def test_adapter_export_holds_only_adapter_parameters(tiny_run):
  model_dir, _ = tiny_run
  exported = train_common.read_params(str(model_dir / "adapters" / "30"))
  full = train_common.read_params(str(model_dir / "checkpoints" / "30"))
  adapters = {k for k in full if "adapter" in k.split("/")}
  assert set(exported) == adapters and adapters
  for name in adapters:
    np.testing.assert_array_equal(exported[name], full[name])


def test_the_evaluated_step_is_kept_as_the_best_with_its_average_validation_score(tiny_run):
  # The shared run evaluates once, at step 30: that is its best so far.
  model_dir, summary = tiny_run
  results = summary["eval_results"]["30"]
  record = json.loads((model_dir / "best" / "best.json").read_text())
  assert record["step"] == 30 and set(record["tasks"]) == set(results)
  assert record["score"] == pytest.approx(
      np.mean([metrics[tables.main_metric(metrics)] for metrics in results.values()]))
  best = trainer.checkpointing.resolve_checkpoint(str(model_dir / "best"))
  assert best == str(model_dir / "best" / "30")
  kept = train_common.read_params(best)
  saved = train_common.read_params(str(model_dir / "checkpoints" / "30"))
  assert set(kept) == set(saved)
  for name in saved:
    np.testing.assert_array_equal(kept[name], saved[name], err_msg=name)


def test_frozen_parameters_get_no_optimizer_state_and_never_change(tiny_run):
  model_dir, _ = tiny_run
  checkpointer = trainer.checkpointing.RunCheckpointer(str(model_dir))
  state = checkpointer.manager.item_metadata(30)["state"].tree
  checkpointer.close()
  # Every parameter-shaped part of the optimizer state is keyed by adapter paths only.
  paths = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]]
  keyed = [p for p in paths if "['text']" in p or "['img" in p]
  assert keyed and all("['adapter']" in p for p in keyed), sorted(keyed)[:5]
  # The backbone is what initialisation produced at step 10 and still is at step 30.
  early = train_common.read_params(str(model_dir / "checkpoints" / "10"))
  late = train_common.read_params(str(model_dir / "checkpoints" / "30"))
  backbone = [k for k in late if "adapter" not in k.split("/")]
  assert backbone and len(backbone) < len(late)
  for name in backbone:
    np.testing.assert_array_equal(early[name], late[name], err_msg=name)
  assert any(not np.array_equal(early[k], late[k]) for k in late if "adapter" in k.split("/"))


def test_sigterm_saves_a_checkpoint_and_a_resumed_run_matches_an_uninterrupted_one(
    tmp_path, data_dir, tiny_run, caplog):
  # A run continues the shared run from its step-10 checkpoint, and this process gets
  # SIGTERM once step 11 is done: the trainer's handler (installed for the run, as in the
  # train binary) makes it save and return, preempted. Without the handler the signal
  # would end the test process.
  straight_dir, _ = tiny_run
  preempted = tmp_path / "preempted"
  shutil.copytree(straight_dir / "checkpoints" / "10", preempted / "checkpoints" / "10")

  def terminate_after_step_11(step):
    if step == 11:
      os.kill(os.getpid(), signal.SIGTERM)

  handler_before = signal.getsignal(signal.SIGTERM)
  caplog.set_level(logging.WARNING)
  stopped_run = train(preempted, data_dir, callbacks=(terminate_after_step_11,),
                      TRAIN_STEPS=1000, CHECKPOINT_PERIOD=1000)
  assert stopped_run.preempted and stopped_run.step == 11
  assert any("Preempted: checkpoint of step 11 saved" in r.getMessage() for r in caplog.records)
  assert sorted(os.listdir(preempted / "checkpoints")) == ["10", "11"]
  assert train_common.read_position(str(preempted / "checkpoints" / "11"))[
      "batches_consumed"] == 11
  assert signal.getsignal(signal.SIGTERM) == handler_before  # the run's handler is gone

  # Resumed to step 20, from the input iterator's state saved when it stopped, it holds what the uninterrupted run held at step 20 (the rsqrt schedule
  # does not depend on TRAIN_STEPS, so 1000 vs 30 changes nothing).
  caplog.set_level(logging.INFO)
  resumed = train(preempted, data_dir, TRAIN_STEPS=20, CHECKPOINT_PERIOD=1000)
  assert resumed.step == 20 and not resumed.preempted
  restored = [r.getMessage() for r in caplog.records if "input iterator" in r.getMessage()]
  assert restored == ["Restored the input iterator's state: continuing after batch 11 "
                      "without replaying"], restored
  got = train_common.read_params(str(preempted / "checkpoints" / "20"))
  want = train_common.read_params(str(straight_dir / "checkpoints" / "20"))
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert train_common.read_position(str(preempted / "checkpoints" / "20"))[
      "batches_consumed"] == 20


def test_a_finished_run_relaunched_exits_at_once_and_writes_nothing(tmp_path, data_dir,
                                                                    tiny_run):
  shutil.copytree(tiny_run[0] / "checkpoints" / "30", tmp_path / "checkpoints" / "30")
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  result = train(tmp_path, data_dir, TRAIN_STEPS=30)
  assert (result.step, result.loss_history, result.preempted) == (30, [], False)
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def _tiny_train_cfg(data_dir, **overrides):
  train_common.configure("unused", data_dir, TRAIN_STEPS=5, **overrides)
  return gin.query_parameter("train.train_dataset_cfg").scoped_configurable_fn()


def _assert_same_batches(got, want):
  for got_batch, want_batch in zip(got, want, strict=True):
    assert set(got_batch) == set(want_batch)
    for key in want_batch:  # tokens, pixels and task ids: the same examples, in order
      np.testing.assert_array_equal(got_batch[key], want_batch[key], err_msg=key)


def test_a_skipped_pipeline_yields_the_batches_an_uninterrupted_one_would(data_dir):
  cfg = _tiny_train_cfg(data_dir, MIXTURE_OR_TASK_NAME="mini_shapes_count_tiny")
  straight = data_iterator.TrainBatches(cfg, 16, 1)
  expected = [next(straight) for _ in range(5)][3:]
  resumed = data_iterator.TrainBatches(cfg, 16, 1, batches_to_skip=3)
  _assert_same_batches([next(resumed) for _ in expected], expected)
  assert resumed.position()["batches_consumed"] == 5


def test_a_restored_iterator_continues_mid_epoch_with_the_batches_of_an_uninterrupted_run(
    tmp_path, data_dir):
  # Saved 3 batches of 8 into a task of 40 training examples (mid-epoch, mid shuffle
  # buffer); the next 3 batches cross into its second epoch. (The trainer's own saves
  # and restores of the mixture's state: the SIGTERM test.)
  cfg = _tiny_train_cfg(data_dir, MIXTURE_OR_TASK_NAME="mini_shapes_count_tiny")
  task = data_iterator.seqio.get_mixture_or_task(cfg.mixture_or_task_name)
  assert 3 * 8 < task.source.num_input_examples("train") < 6 * 8
  straight = data_iterator.TrainBatches(cfg, 16, 1)
  for _ in range(3):
    next(straight)
  checkpointer = trainer.checkpointing.RunCheckpointer(str(tmp_path))
  checkpointer.save(3, {"step": np.int32(3)}, straight.position(),
                    data_iterator=straight.checkpointable)
  expected = [next(straight) for _ in range(3)]  # while Orbax commits the step
  checkpointer.close()
  step_dir = str(tmp_path / "checkpoints" / "3")
  position = train_common.read_position(step_dir)
  resumed = data_iterator.resume(cfg, 16, 1, position, *iterator_state.locate(step_dir))
  assert (resumed.resumed_from, resumed.batches_consumed) == ("state", 3)
  _assert_same_batches([next(resumed) for _ in range(3)], expected)
  assert resumed.position() == dict(position, batches_consumed=6)


class _NoPipeline:
  """Stands in for TrainBatches where only the resume decision is under test."""

  def __init__(self, cfg, image_size, data_parallel_size, batches_to_skip=0, *,
               pix2struct_patching=None):
    del cfg, image_size, data_parallel_size, pix2struct_patching
    self.batches_consumed = batches_to_skip
    self.resumed_from = "skip" if batches_to_skip else "start"

  def restore(self, prefix, batches_consumed):
    raise AssertionError(f"restored {prefix} at {batches_consumed}: it should refuse it")


def _without_iterator_state(step_dir, tmp_path):
  copy = tmp_path / "10"
  shutil.copytree(step_dir, copy, ignore=shutil.ignore_patterns("data_iterator"))
  return copy


def _from_two_hosts(step_dir, tmp_path):
  # What two hosts would have written: their positions say 2, their files are 0-of-2, 1-of-2.
  copy = tmp_path / "10"
  shutil.copytree(step_dir, copy)
  states = copy / "data_iterator"
  for name in os.listdir(states):
    if name.startswith("process_0-of-1"):
      for index in (0, 1):
        shutil.copy(states / name, states / name.replace("0-of-1", f"{index}-of-2"))
      os.remove(states / name)
  position = json.loads((copy / "data" / "metadata").read_text())
  (copy / "data" / "metadata").write_text(json.dumps(dict(position, process_count=2)))
  return copy


@pytest.mark.parametrize("case, overrides, edit, reason", [
    ("missing", {}, _without_iterator_state, "the checkpoint has no input iterator state"),
    ("task", {"MIXTURE_OR_TASK_NAME": "mini_shapes_count_tiny"}, None,
     "mixture_or_task_name: 'mini_trio_tiny' -> 'mini_shapes_count_tiny'"),
    ("batch size", {"BATCH_SIZE": 16}, None, "batch_size: 8 -> 16"),
    ("seed", {"RANDOM_SEED": 1}, None, "seed: 0 -> 1"),
    ("host count", {}, _from_two_hosts, "process_count: 2 -> 1"),
])
def test_a_missing_or_foreign_iterator_state_falls_back_to_skipping_and_says_why(
    tmp_path, data_dir, tiny_run, monkeypatch, caplog, case, overrides, edit, reason):
  step_dir = str(tiny_run[0] / "checkpoints" / "10")
  if edit is not None:
    step_dir = str(edit(step_dir, tmp_path))
  cfg = _tiny_train_cfg(data_dir, **overrides)
  monkeypatch.setattr(data_iterator, "TrainBatches", _NoPipeline)
  caplog.set_level(logging.WARNING)
  batches = data_iterator.resume(cfg, 16, 1, train_common.read_position(step_dir),
                                 *iterator_state.locate(step_dir))
  assert (batches.resumed_from, batches.batches_consumed) == ("skip", 10), case
  warnings = [r.getMessage() for r in caplog.records if "Not restoring" in r.getMessage()]
  assert len(warnings) == 1 and reason in warnings[0], (case, warnings)
  assert "Skipping the 10 consumed batches instead" in warnings[0]


class _PoisonedBatches(data_iterator.TrainBatches):
  """The real pipeline, with NaN pixels in batch number `poison_at` (1-based)."""
  poison_at = 33

  def __next__(self):
    batch = super().__next__()
    if self.batches_consumed == self.poison_at:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    return batch


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, data_dir, monkeypatch, tiny_run):
  # Continue the shared run from its step-30 checkpoint; batch 33 is poisoned.
  shutil.copytree(tiny_run[0] / "checkpoints" / "30", tmp_path / "checkpoints" / "30")
  monkeypatch.setattr(data_iterator, "TrainBatches", _PoisonedBatches)
  with pytest.raises(faults.NonFiniteLossError) as error:
    train(tmp_path, data_dir, TRAIN_STEPS=36, CHECKPOINT_PERIOD=2)
  message = str(error.value)
  assert "at step 33" in message and "last good checkpoint is step 32" in message, message
  assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints")) == [30, 32]
  params = train_common.read_params(str(tmp_path / "checkpoints" / "32"))
  assert all(np.isfinite(v).all() for v in params.values())
