"""Faults, and what survives each: kill -9, unreadable checkpoints, failed writes, corrupt
images in the training mixture, an evaluation that raises, a checkpoint of another model.

Every run continues the session's shared tiny run (train_common.shared_tiny_run), the
uninterrupted reference: a resumed run must end with its parameters, bit for bit.
"""
import contextlib
import errno
import logging
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice_checks"))
import train_common  # noqa: E402

train_common.enable_compilation_cache()

import gin  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

import tasks.mini  # noqa: E402
from omni_smola.checkpoints.restore import CheckpointMismatchError  # noqa: E402
from omni_smola.data import images, register_vl_mixture, register_vl_task  # noqa: E402
from omni_smola.evaluation import metrics  # noqa: E402
from omni_smola.training import checkpointing, data_iterator, iterator_state  # noqa: E402
from omni_smola.training import metrics_logging  # noqa: E402
from omni_smola.training import trainer  # noqa: E402

KILL_SEED = 14  # picks the kill points; the test names them when it fails
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's temporary step directories: <step><suffix>


from run_fixtures import clean_gin, data_dir, shared_programs  # noqa: E402,F401  (fixtures)


class _Records(logging.Handler):
  """What absl logged, however an earlier test left the logger's propagation."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.records = []

  def emit(self, record):
    self.records.append(record)

  @property
  def text(self) -> str:
    return "\n".join(r.getMessage() for r in self.records)


@contextlib.contextmanager
def _absl_records():
  """absl's records at INFO and above, caught on its own logger (caplog listens at the root,
  which misses them once a binary run in this process has stopped their propagation)."""
  logger, handler = logging.getLogger("absl"), _Records()
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    yield handler
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def absl_records():
  with _absl_records() as records:
    yield records


@pytest.fixture(scope="module", autouse=True)
def programs_shared_by_the_module(shared_programs):
  del shared_programs


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """The uninterrupted run: checkpoints at 10, 20, 30."""
  model_dir, _ = train_common.shared_tiny_run(str(tmp_path_factory.getbasetemp().parent),
                                              data_dir)
  return pathlib.Path(model_dir) / "checkpoints"


# The runs here resume by skipping (the reference's step 10 and 30 carry iterator states;
# later steps do not): writing the tiny pipeline's 32 MB iterator state at every step
# was most of these tests' time, and the state's own resume is test_train's. Nor do they
# export the adapters (a second Orbax save per step; test_train checks the export).
LEAN_CHECKPOINTS = {
    "omni_smola.training.checkpointing.CheckpointConfig.save_data_iterator": False,
    "omni_smola.training.checkpointing.CheckpointConfig.export_adapters": False}


def _train(model_dir, data_dir, **overrides):
  train_common.configure(str(model_dir), data_dir, **{**LEAN_CHECKPOINTS, **overrides})
  return trainer.train()


def _steps(checkpoints) -> list:
  return sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())


def _assert_same_params(got_dir, want_dir):
  got, want = train_common.read_params(str(got_dir)), train_common.read_params(str(want_dir))
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=f"{got_dir}: {name}")


def _tree(directory) -> list:
  return sorted(str(p) for p in pathlib.Path(directory).rglob("*"))


# The corrupt-image tests come before the killed and resumed runs: after those, in one
# process, seqio applied the corrupt task's source preprocessor per example (an order
# dependence of the test process not yet understood; each passes alone and first).
CORRUPT_TASK = "faults_corrupt_images"
CLEAN_TASK = "faults_clean_images"
CORRUPT_MIXTURE = "faults_mixture_with_corrupt_images"


def _corrupt(example):
  """About a quarter of the examples (by image_id) get bytes that are no image."""
  broken = tf.equal(tf.strings.to_hash_bucket_fast(example["image_id"], 4), 0)
  return dict(example, image=tf.where(broken, tf.constant(b"not an image"), example["image"]))


def _corrupted(dataset):
  return dataset.map(_corrupt)


@pytest.fixture(scope="module")
def corrupt_mixture():
  """The mini shapes-count task, twice: as it is and with broken images (small buffers)."""
  for name, broken in ((CLEAN_TASK, []), (CORRUPT_TASK, [_corrupted])):
    register_vl_task(name, source=tasks.mini.MiniTfdsSource("tiny", "shapes_count"),
                     vocabulary="mini", source_preprocessors=broken, shuffle_buffer_size=16,
                     **tasks.mini.TASK_KWARGS["shapes_count"])
  register_vl_mixture(CORRUPT_MIXTURE, {CLEAN_TASK: 1.0, CORRUPT_TASK: 1.0})
  return CORRUPT_MIXTURE


def test_a_corrupt_image_in_a_raise_task_stops_the_input_naming_the_task_and_the_example(
    data_dir, corrupt_mixture):
  # The trainer's own pipeline; a failure there ends the run before its next step.
  train_common.configure("unused", data_dir, TRAIN_STEPS=2, MIXTURE_OR_TASK_NAME=corrupt_mixture)
  cfg = gin.query_parameter("train.train_dataset_cfg").scoped_configurable_fn()
  batches = data_iterator.TrainBatches(cfg, 16, 1)
  with pytest.raises(Exception, match=f"Task '{CORRUPT_TASK}': the image of example "
                     r"\(image_id=\S+, question_id=\S*\) cannot be decoded") as error:
    for _ in range(4):
      next(batches)
  image_id = re.search(r"image_id=([^,]+),", str(error.value)).group(1)
  assert int(tf.strings.to_hash_bucket_fast(image_id, 4)) == 0, image_id  # one we broke


class _RecordingWriter:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = dict(scalars)

  def flush(self):
    pass

  def close(self):
    pass


def test_a_skip_task_set_in_gin_drops_corrupt_images_and_the_train_metrics_count_them(
    tmp_path, data_dir, corrupt_mixture, monkeypatch):
  writers = {}

  def recording_writer(model_dir, collection):
    del model_dir
    return writers.setdefault(collection, _RecordingWriter())

  monkeypatch.setattr(metrics_logging, "create_writer", recording_writer)
  result = _train(tmp_path, data_dir, TRAIN_STEPS=2, MIXTURE_OR_TASK_NAME=corrupt_mixture,
                  **{"omni_smola.data.on_corrupt_image.by_task": {CORRUPT_TASK: "skip"}})
  assert result.step == 2
  logged = writers["train"].scalars[2]
  assert logged["skipped_examples"] >= 1, logged
  assert logged[f"skipped_examples/{CORRUPT_TASK}"] == logged["skipped_examples"], logged
  assert CLEAN_TASK not in str(logged)


def test_a_corrupt_image_policy_for_a_task_the_run_does_not_use_is_refused(tmp_path, data_dir):
  with pytest.raises(ValueError, match=r"on_corrupt_image.by_task names \['mini_shapes_cnt'\], "
                     "which this run neither trains nor evaluates on"):
    _train(tmp_path / "run", data_dir, TRAIN_STEPS=2,
           **{"omni_smola.data.on_corrupt_image.by_task": {"mini_shapes_cnt": "skip"}})
  assert not (tmp_path / "run").exists()


class _Binary:
  """The train binary continuing `model_dir`, checkpointing every step; stderr collected."""

  def __init__(self, model_dir, data_dir):
    argv = train_common.binary_command("train", data_dir, MODEL_DIR=str(model_dir),
                                       TRAIN_STEPS=1000, CHECKPOINT_PERIOD=1,
                                       **LEAN_CHECKPOINTS)
    self.process = subprocess.Popen(argv, env=train_common.binary_env(), cwd=train_common.REPO,
                                    stderr=subprocess.PIPE, text=True)
    self.lines = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.process.stderr:
      self.lines.append(line)

  @property
  def output(self) -> str:
    return "".join(self.lines)

  def wait_for(self, condition, what: str, timeout: float = 300):
    """Polls `condition` every 2 ms; the process is killed if it never holds."""
    deadline = time.monotonic() + timeout
    while not condition():
      if self.process.poll() is not None or time.monotonic() > deadline:
        self.process.kill()
        raise AssertionError(f"no {what} (exit status {self.process.wait()}):\n"
                             f"{self.output[-3000:]}")
      time.sleep(0.002)

  def kill(self):
    self.process.kill()  # SIGKILL: no handler, no cleanup, no final save
    self.process.wait(timeout=60)
    self._reader.join(timeout=60)
    assert self.process.returncode == -9, self.output[-2000:]


@pytest.fixture(scope="module")
def killed(tmp_path_factory, data_dir, reference):
  """A run killed -9 while it writes a checkpoint, resumed, finished: (dir, what happened).

  The binary continues the reference's step-10 checkpoint, checkpointing every step, and
  is killed while the write of a seeded step 11..13 is under way (its temporary directory
  exists). This process then resumes it and finishes to step 20, checkpointing every step
  (the last three stay: 18, 19, 20). One binary: a second kill at another moment cost a
  minute of the suite's eight and tested the same resume.
  """
  rng = random.Random(KILL_SEED)
  model_dir = tmp_path_factory.mktemp("killed")
  checkpoints = model_dir / "checkpoints"
  shutil.copytree(reference / "10", checkpoints / "10")
  events = {"seed": KILL_SEED}
  cut = 11 + rng.randrange(3)
  binary = _Binary(model_dir, data_dir)
  binary.wait_for(lambda: any(n.startswith(f"{cut}{TMP_SUFFIX}")
                              for n in os.listdir(checkpoints)),
                  f"checkpoint write of step {cut}")
  binary.kill()
  events.update(cut=cut, after_kill=os.listdir(checkpoints), binary_output=binary.output)
  with _absl_records() as records:
    events["finished"] = _train(model_dir, data_dir, TRAIN_STEPS=20, CHECKPOINT_PERIOD=1)
  events["resume_log"] = records.text
  return model_dir, events


def test_kill_9_during_a_checkpoint_write_resumes_from_the_last_complete_one_bit_identically(
    killed, reference):
  model_dir, events = killed
  cut = events["cut"]
  # The kill left the cut write as a temporary directory, never as a step.
  assert any(n.startswith(f"{cut}{TMP_SUFFIX}") for n in events["after_kill"]), events
  complete = sorted(int(n) for n in events["after_kill"] if n.isdigit())
  assert complete and max(complete) < cut, events
  assert "Resuming from the checkpoint of step 10 " in events["binary_output"], (
      events["binary_output"][-3000:])
  # The relaunch resumed from the last complete step, and read nothing broken.
  assert (f"Resuming from the checkpoint of step {max(complete)} "
          in events["resume_log"]), events["resume_log"][-3000:]
  assert "cannot be read" not in events["resume_log"]
  assert events["finished"].step == 20 and not events["finished"].preempted
  # Nothing lost, nothing repeated: what the uninterrupted run held at step 20.
  _assert_same_params(model_dir / "checkpoints" / "20", reference / "20")
  assert train_common.read_position(str(model_dir / "checkpoints" / "20"))[
      "batches_consumed"] == 20


def _cut_bytes(step_dir):
  """Truncates each of the step's parameter data files to half its size (a copy cut short).

  Every file, not one: which arrays share a file of Orbax's OCDBT store varies, and a
  file holding nothing the restore reads would leave the step readable.
  """
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  assert files, step_dir
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(path.stat().st_size // 2)


def test_unreadable_latest_checkpoints_are_set_aside_and_the_run_resumes_from_the_one_before(
    tmp_path, data_dir, killed, reference, absl_records):
  source = killed[0] / "checkpoints"
  assert _steps(source) == [18, 19, 20]
  checkpoints = tmp_path / "checkpoints"
  shutil.copytree(source, checkpoints, ignore=shutil.ignore_patterns(f"*{TMP_SUFFIX}*"))
  _cut_bytes(checkpoints / "20")
  (checkpoints / "19" / "state" / "_METADATA").unlink()
  result = _train(tmp_path, data_dir, TRAIN_STEPS=21, CHECKPOINT_PERIOD=2)
  warnings = [r.getMessage() for r in absl_records.records if r.levelno == logging.WARNING
              and "cannot be read" in r.getMessage()]
  assert len(warnings) == 2, warnings
  assert warnings[0].startswith(f"The checkpoint of step 20 in {checkpoints} cannot be read ("), (
      warnings[0])
  assert warnings[1].startswith(f"The checkpoint of step 19 in {checkpoints} cannot be read ("), (
      warnings[1])
  assert warnings[1].endswith(f"moved it to {checkpoints / '19.unreadable'} and trying the "
                              "previous one"), warnings[1]
  assert f"Resuming from the checkpoint of step 18 in {checkpoints}" in absl_records.text
  # Kept for inspection, not deleted; the run redid 19..21 from 18 and not from scratch.
  assert sorted(os.listdir(checkpoints)) == ["18", "19.unreadable", "20", "20.unreadable", "21"]
  assert result.step == 21
  _assert_same_params(checkpoints / "20", reference / "20")


def test_when_no_checkpoint_can_be_read_the_run_stops_instead_of_starting_from_scratch(
    tmp_path, data_dir, killed):
  shutil.copytree(killed[0] / "checkpoints" / "18", tmp_path / "checkpoints" / "18")
  _cut_bytes(tmp_path / "checkpoints" / "18")
  with pytest.raises(checkpointing.UnreadableCheckpointError,
                     match=r"no checkpoint in .*checkpoints can be read: step 18 \(\w+: .*\), "
                     r"now .*18\.unreadable\. Not starting from scratch"):
    _train(tmp_path, data_dir, TRAIN_STEPS=21)
  assert sorted(os.listdir(tmp_path)) == ["checkpoints"]  # no config.gin, no logs
  assert os.listdir(tmp_path / "checkpoints") == ["18.unreadable"]


def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_previous_checkpoint_restorable(
    tmp_path, data_dir, killed, monkeypatch):
  # The disk fills while the background commit writes step 19's input iterator state.
  source = killed[0] / "checkpoints"
  shutil.copytree(source / "18", tmp_path / "checkpoints" / "18")
  write = iterator_state.DataIteratorHandler.async_save

  async def disk_full_at_19(self, directory, args):
    if directory.parent.name.startswith(f"19{TMP_SUFFIX}"):
      async def fail():
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))
      return [ocp.future.CommitFutureAwaitingContractedSignals(fail(), name="data_iterator")]
    return await write(self, directory, args)

  monkeypatch.setattr(iterator_state.DataIteratorHandler, "async_save", disk_full_at_19)
  with pytest.raises(checkpointing.CheckpointWriteError) as error:
    _train(tmp_path, data_dir, TRAIN_STEPS=20, CHECKPOINT_PERIOD=1,
           **{"omni_smola.training.checkpointing.CheckpointConfig.save_data_iterator":
              True})  # the write that fails
  message = str(error.value)
  assert "writing the checkpoint of step 19 " in message, message
  assert "No space left on device" in message, message
  assert f"the last complete checkpoint, step 18 in {tmp_path / 'checkpoints'}, is intact" in (
      message)
  assert _steps(tmp_path / "checkpoints") == [18]
  _assert_same_params(tmp_path / "checkpoints" / "18", source / "18")
  # Restorable: a relaunch resumes from it and writes what the killed run wrote at 19.
  monkeypatch.undo()
  gin.clear_config()
  assert _train(tmp_path, data_dir, TRAIN_STEPS=19).step == 19
  _assert_same_params(tmp_path / "checkpoints" / "19", source / "19")


def test_a_checkpoint_of_another_model_config_is_refused_naming_it_and_nothing_is_written(
    tmp_path, data_dir, reference):
  shutil.copytree(reference / "10", tmp_path / "checkpoints" / "10")
  before = _tree(tmp_path)
  with pytest.raises(CheckpointMismatchError) as error:
    _train(tmp_path, data_dir, TRAIN_STEPS=12,
           **{"omni_smola.nn.adapter_spec.AdapterSpec.rank": 4})
  message = str(error.value)
  assert message.startswith("the checkpoint of step 10 in "), message[:300]
  assert ("shape mismatch: text/encoder/layers_0/mlp/wo/adapter/mm/experts/expert_a: "
          "checkpoint (2, 64, 2) vs model (2, 64, 4)") in message, message[:1000]
  assert _tree(tmp_path) == before  # not set aside as unreadable: the config is wrong


# ------------------------------------------------------------ corrupt images, crashing metrics

CRASHING_TASK = "faults_crashing_metric"


@pytest.fixture(scope="module")
def crashing_eval_mixture():
  calls = []

  def fails_the_first_time(targets, predictions):
    calls.append(len(targets))
    if len(calls) == 1:
      raise ZeroDivisionError("the metric divided by zero")
    return metrics.exact_match(targets, predictions)

  kwargs = dict(tasks.mini.TASK_KWARGS["shapes_count"], metric_fns=(fails_the_first_time,))
  register_vl_task(CRASHING_TASK, source=tasks.mini.MiniTfdsSource("tiny", "shapes_count"),
                   vocabulary="mini", **kwargs)
  return register_vl_mixture("faults_eval", {"mini_shapes_count_tiny": 1.0,
                                             CRASHING_TASK: 1.0}).name


def test_an_evaluation_whose_metric_raises_is_logged_with_the_task_and_training_goes_on(
    tmp_path, data_dir, reference, crashing_eval_mixture, absl_records):
  shutil.copytree(reference / "30", tmp_path / "checkpoints" / "30")
  result = _train(tmp_path, data_dir, TRAIN_STEPS=32, EVAL_PERIOD=1, EVAL_NUM_EXAMPLES=4,
                  CHECKPOINT_PERIOD=1000, **{
                      "train_infer/omni_smola.training.data_iterator.DatasetConfig."
                      "mixture_or_task_name": crashing_eval_mixture})
  assert result.step == 32
  assert result.eval_failures == {31: {
      CRASHING_TASK: "ZeroDivisionError: the metric divided by zero"}}, result.eval_failures
  errors = [r.getMessage() for r in absl_records.records if r.levelno == logging.ERROR]
  assert any(f"task '{CRASHING_TASK}' raised" in m and "step 31" in m for m in errors), errors
  # The other task of that evaluation counted; the next evaluation ran every task.
  assert set(result.eval_results[31]) == {"mini_shapes_count_tiny"}
  assert set(result.eval_results[32]) == {"mini_shapes_count_tiny", CRASHING_TASK}
  from omni_smola.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  assert set(evaluator.read_metrics(str(tmp_path / "eval"))) == {"31", "32"}
