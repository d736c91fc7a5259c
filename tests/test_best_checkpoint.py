"""Keeping the best checkpoint by average validation score, on toy trees (no training)."""
import json
import logging
import os

import numpy as np
import pytest

from omni_smola.training import best_checkpoint, checkpointing


def _state(value: float):
  """A TrainState.to_checkpoint-shaped tree whose every parameter holds `value`."""
  return {"step": np.int32(value),
          "params": {"layer": {"kernel": np.full((4, 3), value, np.float32),
                               "adapter": {"a": np.full((4, 2), value, np.float32)}}},
          "opt_state": {"count": np.int32(value)}}


def _results(caption_cider: float, qa_exact_match: float):
  """Two tasks with a main metric and a side metric each (the side one must not count)."""
  return {"caption": {"bleu": 1000.0, "cider": caption_cider},
          "qa": {"anls": -1000.0, "exact_match": qa_exact_match}}


def _offer(keeper, step, score):
  return keeper.offer(step, _results(score, score), lambda: _state(step),
                      {"batches_consumed": step})


def _kept_steps(model_dir):
  return [step for step, _ in checkpointing.all_checkpoints(str(model_dir / "best"))]


def _params_of(path):
  target = {"layer": {"kernel": np.zeros((4, 3), np.float32),
                      "adapter": {"a": np.zeros((4, 2), np.float32)}}}
  return checkpointing.restore_params(path, target)


def test_the_score_is_the_mean_over_tasks_of_each_tasks_main_metric():
  score, tasks = best_checkpoint.validation_score(
      {**_results(120.0, 40.0), "empty": {}, "other": {"zeta": 3.0, "alpha": 2.0}})
  assert tasks == {"caption": {"metric": "cider", "value": 120.0},
                   "qa": {"metric": "exact_match", "value": 40.0},
                   "other": {"metric": "alpha", "value": 2.0}}
  assert score == pytest.approx((120.0 + 40.0 + 2.0) / 3)
  assert best_checkpoint.validation_score({"empty": {}}) == (None, {})


def test_only_a_strictly_better_score_replaces_the_best_and_the_record_names_it(
    tmp_path, caplog):
  keeper = best_checkpoint.BestCheckpointKeeper(str(tmp_path))
  assert not (tmp_path / "best").exists()  # nothing on disk before a best
  caplog.set_level(logging.INFO)
  assert [_offer(keeper, step, score) for step, score in
          [(10, 50.0), (20, 30.0), (30, 70.0), (40, 70.0), (50, float("nan"))]] == [
              True, False, True, False, False]
  keeper.close()
  assert _kept_steps(tmp_path) == [30]  # the previous best was deleted
  record = json.loads((tmp_path / "best" / "best.json").read_text())
  assert record == {"step": 30, "score": 70.0,
                    "tasks": {"caption": {"metric": "cider", "value": 70.0},
                              "qa": {"metric": "exact_match", "value": 70.0}}}
  new_best_lines = [r.getMessage() for r in caplog.records
                    if r.getMessage().startswith("New best checkpoint")]
  assert len(new_best_lines) == 2 and "step 30" in new_best_lines[1]
  # What users pass as CHECKPOINT_PATH: best/ resolves to its one step, which restores.
  assert checkpointing.resolve_checkpoint(str(tmp_path / "best")) == str(tmp_path / "best" / "30")
  assert checkpointing.step_of(checkpointing.resolve_checkpoint(str(tmp_path / "best"))) == 30
  np.testing.assert_array_equal(_params_of(str(tmp_path / "best"))["layer"]["kernel"],
                                np.full((4, 3), 30.0))
  assert json.loads((tmp_path / "best" / "30" / "data" / "metadata").read_text()) == {
      "batches_consumed": 30}


def test_a_resumed_run_never_replaces_a_better_earlier_best(tmp_path):
  first = best_checkpoint.BestCheckpointKeeper(str(tmp_path))
  assert _offer(first, 10, 50.0)
  first.close()
  resumed = best_checkpoint.BestCheckpointKeeper(str(tmp_path))
  assert resumed.record.step == 10 and resumed.record.score == 50.0
  assert not _offer(resumed, 20, 45.0)
  assert _offer(resumed, 30, 55.0)
  resumed.close()
  assert _kept_steps(tmp_path) == [30]


def test_a_crash_before_the_record_is_replaced_leaves_the_old_best_committed(
    tmp_path, monkeypatch):
  keeper = best_checkpoint.BestCheckpointKeeper(str(tmp_path))
  assert _offer(keeper, 10, 50.0)

  def crash(*args):
    raise KeyboardInterrupt("killed between writing best.json.tmp and renaming it")

  monkeypatch.setattr(best_checkpoint.os, "replace", crash)
  with pytest.raises(KeyboardInterrupt):
    _offer(keeper, 20, 60.0)
  monkeypatch.undo()
  keeper.close()
  # The record still names step 10 whole; step 20's state is complete but uncommitted.
  assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 10
  assert _kept_steps(tmp_path) == [10, 20]
  # The resumed run discards the uncommitted step and compares against step 10's score.
  resumed = best_checkpoint.BestCheckpointKeeper(str(tmp_path))
  assert _kept_steps(tmp_path) == [10]
  assert checkpointing.resolve_checkpoint(str(tmp_path / "best")) == str(tmp_path / "best" / "10")
  assert _offer(resumed, 20, 55.0)
  resumed.close()
  assert _kept_steps(tmp_path) == [20]


@pytest.mark.parametrize("eval_period, evaluates_tasks", [(0, True), (100, False)])
def test_keep_best_without_evaluation_warns_once_naming_both_settings(
    tmp_path, caplog, eval_period, evaluates_tasks):
  caplog.set_level(logging.INFO)
  assert best_checkpoint.keeper_for_run(str(tmp_path), True, eval_period,
                                        evaluates_tasks) is None
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert "keep_best" in warnings[0] and "eval_period" in warnings[0]
  assert "infer_eval_dataset_cfg" in warnings[0]
  assert not os.listdir(tmp_path)


def test_keep_best_off_or_with_evaluation_says_nothing(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  assert best_checkpoint.keeper_for_run(str(tmp_path), False, 0, False) is None
  keeper = best_checkpoint.keeper_for_run(str(tmp_path), True, 100, True)
  assert isinstance(keeper, best_checkpoint.BestCheckpointKeeper)
  keeper.close()
  assert not caplog.records
