"""Evaluation: periodic during training, and the eval binary over every checkpoint."""
import dataclasses
import json
import math
import os
import pathlib
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice_checks"))
import train_common  # noqa: E402

train_common.enable_compilation_cache()

import gin  # noqa: E402
from flax import linen as nn  # noqa: E402
import numpy as np  # noqa: E402
import seqio  # noqa: E402

import model_fixtures  # noqa: E402
from omni_smola import eval as eval_lib  # noqa: E402
from omni_smola import launching  # noqa: E402
from omni_smola.checkpoints import flatten, unflatten  # noqa: E402
from omni_smola.evaluation import evaluator  # noqa: E402
from omni_smola.model import PaliModel  # noqa: E402
from omni_smola.models import configs  # noqa: E402
from omni_smola.nn import AdapterPlan, AdapterSpec  # noqa: E402
from omni_smola.training import data_iterator, partitioned_step, trainer  # noqa: E402

import tasks.mini  # noqa: E402

# The shared run's mixture, mini_trio_tiny: a caption (CIDEr), a count, a reading task (ANLS).
TASKS = {tasks.mini.task_name(name, "tiny") for name in tasks.mini.TRIO_SUBTASKS}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return train_common.prepare_data(str(tmp_path_factory.getbasetemp().parent / "mini_tiny"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """The session's tiny run: checkpoints at 10, 20, 30, 4 examples per task evaluated at 30."""
  model_dir, summary = train_common.shared_tiny_run(
      str(tmp_path_factory.getbasetemp().parent), data_dir)
  return pathlib.Path(model_dir), summary


def _check_outputs(output_dir, steps):
  metrics = evaluator.read_metrics(str(output_dir))
  assert sorted(metrics) == sorted(str(s) for s in steps)
  for step in steps:
    assert set(metrics[str(step)]) == TASKS
    for task, values in metrics[str(step)].items():
      assert values and all(0.0 <= v <= 100.0 for v in values.values()), (task, values)
    assert "cider" in metrics[str(step)]["mini_shapes_caption_tiny"]
    assert {"exact_match", "anls"} <= set(metrics[str(step)]["mini_text_read_tiny"])
    for task in TASKS:
      path = output_dir / "predictions" / f"{task}-{step:06d}.jsonl"
      lines = [json.loads(line) for line in path.read_text().splitlines()]
      assert len(lines) == 4, path
      assert {"index", "task", "inputs", "target", "prediction", "output", "image_id"} <= set(
          lines[0]), lines[0]
      assert isinstance(lines[0]["target"], list) and isinstance(lines[0]["prediction"], str)


def test_training_evaluates_every_eval_period_with_the_tasks_metrics(trained):
  model_dir, summary = trained
  assert set(summary["eval_results"]) == {"30"} and set(summary["eval_results"]["30"]) == TASKS
  _check_outputs(model_dir / "eval", [30])
  assert any(n.startswith("events.out") for n in os.listdir(model_dir / "eval"))


def test_eval_binary_evaluates_every_checkpoint_and_writes_metrics_and_predictions(
    trained, data_dir, tmp_path):
  model_dir, summary = trained
  train_common.configure(None, data_dir, train_common.EVAL_GIN_FILES, train_common.EVAL_BINDINGS,
                         CHECKPOINT_PATH=str(model_dir), EVAL_OUTPUT_DIR=str(tmp_path),
                         EVAL_ALL_CHECKPOINTS=True)
  results = eval_lib.evaluate()
  gin.clear_config()
  assert sorted(results) == [10, 20, 30]
  _check_outputs(tmp_path, [10, 20, 30])
  # The same checkpoint and examples give the numbers training-time evaluation gave.
  assert results[30] == summary["eval_results"]["30"]


def test_eval_rejects_a_missing_checkpoint_before_writing(data_dir, tmp_path):
  output_dir = tmp_path / "out"
  train_common.configure(None, data_dir, train_common.EVAL_GIN_FILES, train_common.EVAL_BINDINGS,
                         CHECKPOINT_PATH=str(tmp_path / "nothing_here"),
                         EVAL_OUTPUT_DIR=str(output_dir))
  with pytest.raises(SystemExit, match="checkpoint path does not exist: .*nothing_here"):
    launching.exit_on_user_error(eval_lib.evaluate)
  gin.clear_config()
  assert not output_dir.exists()


# --- mixed-task batches through a specialist bank ------------------------------------------

BANK_TASKS = ("mini_photo_qa_tiny", "mini_shapes_count_tiny")  # sorted: the bank's rows
BANK_MIXTURE = "test_eval_bank_tasks_tiny"
PER_TASK, EVAL_BATCH = 5, 4  # 5 rows per task: every per-task batch list ends padded


def _counting_batches(made):
  """Counts the batches `made` (a ModelEvaluator) runs, in `made.batches_run`."""
  made.batches_run = 0
  batches = made._batches  # pylint: disable=protected-access

  def counted(dataset):
    for batch in batches(dataset):
      made.batches_run += 1
      yield batch
  made._batches = counted  # pylint: disable=protected-access


def _predictions(output_dir, task):
  return (output_dir / "predictions" / f"{task}-000000.jsonl").read_text().splitlines()


def test_mixed_task_batches_give_each_task_what_its_specialist_gives_alone(data_dir, tmp_path):
  """A bank's eval over two tasks in shared batches: each task's metrics and predictions
  file equal its evaluation in batches of its own, with only its specialist in the bank,
  and the padding of the one partial batch reaches neither."""
  data_iterator.check_registered(BANK_TASKS[0], "tasks")  # imports the mini tasks
  seqio.set_tfds_data_dir_override(data_dir)
  if BANK_MIXTURE not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(BANK_MIXTURE, list(BANK_TASKS), default_rate=1.0)
  tiny = configs.CONFIGS["tiny"]
  model = PaliModel(dataclasses.replace(tiny, text=dataclasses.replace(
      tiny.text, vocab_size=1024)), AdapterPlan(  # the mini vocabulary: 1000 pieces
          adapter=AdapterSpec(kind="lora", rank=2),
          specialist_adapter=AdapterSpec(kind="task_lora", rank=2, tasks=BANK_TASKS)))
  cfg = data_iterator.DatasetConfig(BANK_MIXTURE, {"inputs": 16, "targets": 16},
                                    split="validation", batch_size=EVAL_BATCH, shuffle=False,
                                    seed=42, module="tasks")
  partitioner = partitioned_step.Partitioner()
  abstract = partitioned_step.abstract_variables(model, trainer.input_shapes(model, cfg))
  made = evaluator.ModelEvaluator(model, partitioner,
                                  partitioner.variables_sharding(abstract)["params"], cfg,
                                  str(tmp_path), num_examples=PER_TASK)
  assert made.mix_tasks  # the documented default
  _counting_batches(made)
  flat = flatten(model_fixtures.random_like(nn.unbox(abstract["params"]), seed=3))
  flat = {k: 3 * v if "/specialist_adapter/" in k else v for k, v in flat.items()}
  results = made.evaluate(unflatten(flat), 0)
  assert made.batches_run == math.ceil(len(BANK_TASKS) * PER_TASK / EVAL_BATCH)
  mixed_lines = {task: _predictions(tmp_path, task) for task in BANK_TASKS}
  made.mix_tasks = False  # each task in batches of its own, as seqio feeds them
  for row, task in enumerate(BANK_TASKS):
    # Every bank row holding this task's specialist: its own adapter, nothing mixed.
    only = unflatten({k: np.repeat(v[row:row + 1], len(BANK_TASKS), axis=0)
                      if "/specialist_adapter/" in k else v for k, v in flat.items()})
    made.batches_run = 0
    assert made.evaluate(only, 0)[task] == results[task]
    assert made.batches_run == len(BANK_TASKS) * math.ceil(PER_TASK / EVAL_BATCH)
    assert len(mixed_lines[task]) == PER_TASK and mixed_lines[task] == _predictions(
        tmp_path, task)
  assert not made.last_failures
