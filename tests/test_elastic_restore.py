"""Elastic restore: a checkpoint resumes on another mesh or host count (DESIGN.md 6.2).

Where the training runs are, to share their processes and compilations:
multidevice_checks/train_mesh.py (test_train_multidevice.py's 8-device run) resumes
its (data=4, model=2) checkpoint on (2, 4), (8, 1) and one device, and refuses
(1, 8); test_multiprocess_train.py resumes its two processes' checkpoint in one.
Here, in this process: the data order across a host count change, and meshes that
must fail before anything is written.
"""
import os
import sys
from unittest import mock

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice_checks"))
import train_common  # noqa: E402

from omni_smola.training import data_iterator, trainer  # noqa: E402

EPOCH = 64  # mp_indexed's training examples
BATCH = 8


def _indices(dataset, count):
  """The example indices ('example 17' -> 17) of `count` converted examples."""
  rows = [next(dataset)["encoder_input_tokens"] for _ in range(count)]
  vocabulary = data_iterator.seqio.ByteVocabulary()
  return [int(vocabulary.decode(row.tolist()).split()[-1]) for row in rows]


def _host_rows(process_count, process_index, count, examples_to_skip=0):
  """Host `process_index` of `process_count`'s first `count` examples of one epoch."""
  cfg = data_iterator.DatasetConfig(
      "mp_indexed", {"inputs": 16, "targets": 4}, batch_size=BATCH, seed=7,
      module="multidevice_checks.multiprocess_tasks")
  data_iterator.import_task_modules(cfg.module)
  with mock.patch.object(jax, "process_count", lambda: process_count), \
      mock.patch.object(jax, "process_index", lambda: process_index):
    dataset = data_iterator.model_dataset(cfg, 16, num_epochs=1,
                                          examples_to_skip=examples_to_skip)
  return _indices(dataset.as_numpy_iterator(), count)


def test_a_run_resumed_on_another_host_count_sees_each_example_of_the_epoch_once():
  # Two hosts consume 3 global batches; one host resumes by skipping 3 x BATCH examples.
  consumed = 3
  hosts = [_host_rows(2, i, consumed * BATCH // 2) for i in range(2)]
  resumed = _host_rows(1, 0, EPOCH - consumed * BATCH, examples_to_skip=consumed * BATCH)
  seen = hosts[0] + hosts[1] + resumed
  assert sorted(seen) == list(range(EPOCH)), seen  # each example once
  assert seen != sorted(seen)  # in the seed's shuffled order


def test_a_host_count_change_keeps_the_position_but_not_the_iterator_states():
  position = {"batches_consumed": 5, "mixture_or_task_name": "t", "split": "train",
              "batch_size": BATCH, "seed": 0, "process_count": 2}
  cfg = data_iterator.DatasetConfig("t", batch_size=BATCH, seed=0)
  assert data_iterator.pipeline_changes(
      position, cfg, 0, data_iterator.ORDER_FIELDS, unrecorded_changed=False) == []
  assert data_iterator.pipeline_changes(
      position, cfg, 0, data_iterator.HOST_FIELDS, unrecorded_changed=False) == [
          "process_count: 2 -> 1"]


@pytest.mark.parametrize("binding, value, named", [
    ("model", 2, "1 devices are not divisible by model=2"),
    ("data", 3, "data=3 x model=1 x expert=1 != 1 devices"),
])
def test_a_mesh_that_does_not_divide_the_devices_fails_naming_it_before_writing(
    tmp_path, binding, value, named):
  model_dir = tmp_path / "run"
  # No data is read: the mesh fails first.
  train_common.configure(str(model_dir), str(tmp_path), TRAIN_STEPS=2,
                         **{f"omni_smola.partitioning.create_mesh.{binding}": value})
  try:
    with pytest.raises(ValueError, match=named):
      trainer.train()
  finally:
    trainer.gin.clear_config()
  assert not model_dir.exists()
