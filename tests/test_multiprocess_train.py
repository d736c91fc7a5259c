"""A real multi-process run: two train processes of 4 CPU devices each form one 8-device mesh.

Both processes run `python -m omni_smola.train` (started as `launch/multihost.py
--local_processes=2` starts them: gloo collectives, coordinator on 127.0.0.1),
train the tiny model for a few steps with data parallelism over all 8 devices,
each feeding its own rows of the data, and write checkpoints together. Then one
process on one device resumes their step-1 checkpoint (elastic restore, DESIGN.md
6.2: another process count, another mesh) and trains step 2: it must reach the
two processes' step-2 loss and parameters. That also checks the data order: the
input is shuffled, process p of 2 keeps examples p, p + 2, ... of the one global
order, and the single process skips the consumed global batch, so its step 2
sees the examples of the pair's, in another order, which a mean loss does not see.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from launch import commands, multihost
from omni_smola.checkpoints import orbax_format

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
TIMEOUT_S = 400
TRAIN_ARGS = [
    # LoRA on the MLPs: the point is the multi-process plumbing, and every adapter op
    # costs compile time in each of the three processes.
    "--gin_file=models/tiny.gin", "--gin_file=adapters/lora.gin",
    "--gin_file=runs/generalist.gin",
    "--gin.omni_smola.nn.adapter_spec.AdapterSpec.sites=('mlp/',)",
    "--gin.omni_smola.training.checkpointing.CheckpointConfig.export_adapters=False",
    "--gin.MIXTURE_OR_TASK_NAME=mp_colors",
    "--gin.MIXTURE_OR_TASK_MODULE=multidevice_checks.multiprocess_tasks",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 40, 'targets': 8}",
    f"--gin.TRAIN_STEPS={STEPS}", "--gin.CHECKPOINT_PERIOD=1", "--gin.BATCH_SIZE=8",
    "--gin.EVAL_PERIOD=0", "--gin.WARMUP_STEPS=0", "--gin.LEARNING_RATE=0.05",
    "--gin.omni_smola.training.trainer.train.log_period=1",
]


def _environment():
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             CUDA_VISIBLE_DEVICES="")
  env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"),
                                       env.get("PYTHONPATH", "")])
  env.pop("XLA_FLAGS", None)
  return env


def _losses(log_path):
  """{step: loss} from the train binary's console log (4 decimals)."""
  with open(log_path) as f:
    text = f.read()
  return {int(s): float(l) for s, l in re.findall(r"step (\d+)/\d+\s+loss ([0-9.]+)", text)}


def _scalar_losses(model_dir):
  """{step: loss} at full precision, from the TensorBoard events process 0 writes."""
  import tensorflow as tf
  losses = {}
  for path in glob.glob(os.path.join(model_dir, "train", "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "loss":
          losses[event.step] = float(tf.make_ndarray(value.tensor))
  return losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  single_dir, multi_dir = str(root / "single"), str(root / "multi")
  env = _environment()
  test_flags = os.environ.get("XLA_FLAGS", "")  # conftest's, without any device count
  pair = multihost.local_commands(2, 4, TRAIN_ARGS, model_dir=multi_dir,
                                  port=commands.free_port(), env={"XLA_FLAGS": test_flags})
  single = commands.train_argv(TRAIN_ARGS, python=sys.executable, model_dir=single_dir)
  logs = [str(root / f"process_{i}.log") for i in range(2)] + [str(root / "single.log")]

  def run(argvs, envs, log_paths):
    try:
      codes = commands.run_all(argvs, timeout=TIMEOUT_S, envs=envs, log_paths=log_paths,
                               cwd=REPO)
    except subprocess.TimeoutExpired:
      pytest.fail(f"the runs did not finish within {TIMEOUT_S} s (all killed):\n" +
                  "\n".join(open(p).read()[-2000:] for p in log_paths))
    if any(codes):
      pytest.fail(f"exit codes {codes}:\n" + "\n".join(
          f"--- {p}\n{open(p).read()[-4000:]}" for p in log_paths))

  run([argv for argv, _ in pair], [dict(env, **extra) for _, extra in pair], logs[:2])
  # One process, one device, resumes the pair's step 1.
  shutil.copytree(os.path.join(multi_dir, "checkpoints", "1"),
                  os.path.join(single_dir, "checkpoints", "1"))
  run([single], [dict(env, XLA_FLAGS=test_flags)], logs[2:])
  return {"single": single_dir, "multi": multi_dir, "logs": logs}


def test_two_processes_form_one_eight_device_mesh(runs):
  for index, log in enumerate(runs["logs"][:2]):
    with open(log) as f:
      assert f"Process {index} of 2; 4 local / 8 global devices" in f.read()


def test_one_process_resuming_the_pair_reaches_their_next_loss(runs):
  single, multi = _scalar_losses(runs["single"]), _scalar_losses(runs["multi"])
  assert sorted(multi) == list(range(1, STEPS + 1)) and sorted(single) == [STEPS]
  assert single[STEPS] == pytest.approx(multi[STEPS], rel=1e-5, abs=1e-6)
  assert multi[STEPS] != multi[1]  # training moved
  # Both processes computed (and logged) the same global losses.
  console = [_losses(log) for log in runs["logs"][:2]]
  assert console[0] == console[1] and set(console[0]) == set(multi)
  # The pair's iterator states are not for one process: it skipped the consumed batch.
  with open(runs["logs"][2]) as f:
    log = f.read()
  assert "process_count: 2 -> 1" in log and "Skipping the 1 consumed batches" in log, log[-3000:]


def test_the_checkpoints_written_together_equal_the_resumed_single_process_one(runs):
  steps = sorted(os.listdir(os.path.join(runs["multi"], "checkpoints")))
  assert steps == ["1", str(STEPS)]  # complete step directories, no leftover temporaries
  for log in runs["logs"][:2]:  # both processes took part in the save
    with open(log) as f:
      assert f"Saving checkpoint for step {STEPS}" in f.read()
  multi = orbax_format.read_orbax(os.path.join(runs["multi"], "checkpoints", str(STEPS),
                                               "state"))
  single = orbax_format.read_orbax(os.path.join(runs["single"], "checkpoints", str(STEPS),
                                                "state"))
  assert sorted(multi) == sorted(single)
  # Each process saved the state of the input iterator of its own shard, in the same step.
  states = os.listdir(os.path.join(runs["multi"], "checkpoints", str(STEPS), "data_iterator"))
  assert {n.split(".")[0] for n in states if n.startswith("process_")} == {
      "process_0-of-2", "process_1-of-2"}
  adapters = [name for name in multi if "/adapter/" in name]
  assert adapters
  for name in multi:
    np.testing.assert_allclose(multi[name], single[name], rtol=1e-4, atol=2e-5,
                               err_msg=name)
