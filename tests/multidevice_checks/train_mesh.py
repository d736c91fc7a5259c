"""The trainer on 8 CPU devices: meshes agree, and a checkpoint resumes on another mesh.

Usage: train_mesh.py DATA_DIR WORK_DIR (DATA_DIR is not read: the task is synthetic).

1. One device and a (data=4, model=2) mesh train the same 3 steps: the same losses
   and parameters. Prints `LOSSES <mesh> <json>` per run.
2. Elastic restore (DESIGN.md 6.2): the (4, 2) run's step-2 checkpoint resumes on
   (2, 4) (every array laid out anew) and one device (every array gathered). The
   restored parameters and optimizer state equal what the (4, 2) run saved, laid out on
   the new mesh, and the next step reaches the (4, 2) run's step-3 loss and parameters.
   Prints `LOSS <mesh> <loss>` per resume.
3. A (1, 8) mesh cannot split the 4 attention heads: the resume fails naming them,
   before anything is written.

Prints `OK` at the end; exits non-zero when anything differs.
"""
import json
import os
import shutil
import sys

import train_common

train_common.enable_compilation_cache()

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from omni_smola import partitioning  # noqa: E402
from omni_smola.training import checkpointing, partitioned_step, program_cache  # noqa: E402
from omni_smola.training import trainer  # noqa: E402

assert jax.device_count() == 8, jax.devices()
work_dir = sys.argv[2]
STEPS, SAVED = 3, 2
# LoRA keeps the compilations short (Omni-SMoLA's own sharding is checked per layer by
# adapter_sharding.py); one synthetic task of 16x16 images builds its pipeline in a second.
GIN_FILES = ("models/tiny.gin", "adapters/lora.gin", "runs/generalist.gin")
BINDINGS = {
    "MIXTURE_OR_TASK_NAME": "mp_colors", "MIXTURE_OR_TASK_MODULE": "multiprocess_tasks",
    "TASK_FEATURE_LENGTHS": {"inputs": 40, "targets": 8},
    "TRAIN_STEPS": STEPS, "CHECKPOINT_PERIOD": SAVED,
    "omni_smola.training.checkpointing.CheckpointConfig.export_adapters": False,
    "omni_smola.training.trainer.train.log_period": 1,
}


def partitioner_for(shape):
  devices = np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape)
  return partitioned_step.Partitioner(mesh=jax.sharding.Mesh(devices, ("data", "model")))


def train(name, shape, from_checkpoint=None):
  """trainer.train on a `shape` mesh in WORK_DIR/name, resuming a copied step dir."""
  model_dir = os.path.join(work_dir, name)
  if from_checkpoint is not None:
    shutil.copytree(from_checkpoint, os.path.join(model_dir, "checkpoints", str(SAVED)))
  # The synthetic task reads no TFDS data.
  train_common.configure(model_dir, work_dir, GIN_FILES, **BINDINGS)
  try:
    return model_dir, trainer.train(partitioner=partitioner_for(shape))
  finally:
    gin.clear_config()


def assert_params_close(model_dir, reference_dir, what):
  reference = train_common.read_params(os.path.join(reference_dir, "checkpoints", str(STEPS)))
  params = train_common.read_params(os.path.join(model_dir, "checkpoints", str(STEPS)))
  assert sorted(params) == sorted(reference), what
  for key, value in reference.items():
    scale = float(np.max(np.abs(value))) + 1e-6
    assert float(np.max(np.abs(params[key] - value))) <= 1e-3 * scale, (what, key)


# What the trainer saves at step 2 and what it restores, as host arrays, and the meshes.
recorded = {}
_save, _restore = checkpointing.RunCheckpointer.save, checkpointing.RunCheckpointer.restore


def recording_save(self, step, state_tree, *args, **kwargs):
  if step == SAVED:
    recorded["saved"] = jax.tree_util.tree_map(np.asarray, state_tree)
  return _save(self, step, state_tree, *args, **kwargs)


def recording_restore(self, step, abstract_state):
  state, position = _restore(self, step, abstract_state)
  recorded["restored"] = jax.tree_util.tree_map(np.asarray, state)
  recorded["meshes"] = {leaf.sharding.mesh.devices.shape
                        for leaf in jax.tree_util.tree_leaves(state)}
  return state, position


checkpointing.RunCheckpointer.save = recording_save
checkpointing.RunCheckpointer.restore = recording_restore

# The runs on one mesh share their programs (the one-device resume, the one-device run's).
with program_cache.shared_programs():
  # 1. One device and (4, 2) from scratch.
  trajectories, dirs = {}, {}
  for name, shape in (("one_device", (1, 1)), ("data4_model2", (4, 2))):
    dirs[name], result = train(name, shape)
    trajectories[name] = [loss for _, loss in result.loss_history]
    print("LOSSES", name, json.dumps(trajectories[name]), flush=True)
  one, sharded = trajectories["one_device"], trajectories["data4_model2"]
  assert len(one) == STEPS, one
  np.testing.assert_allclose(sharded, one, rtol=2e-4, atol=2e-4)
  assert_params_close(dirs["data4_model2"], dirs["one_device"], "data4_model2")

  # 2. The (4, 2) step-2 checkpoint resumed on other meshes.
  saved_dir = os.path.join(dirs["data4_model2"], "checkpoints", str(SAVED))
  for name, shape in (("resumed_data2_model4", (2, 4)), ("resumed_one_device", (1, 1))):
    model_dir, result = train(name, shape, from_checkpoint=saved_dir)
    jax.tree_util.tree_map_with_path(
        lambda path, new, old, run=name: np.testing.assert_array_equal(
            new, old, err_msg=f"{run}: {jax.tree_util.keystr(path)}"),
        recorded.pop("restored"), recorded["saved"])
    assert recorded["meshes"] == {shape}, (name, recorded["meshes"])
    assert [step for step, _ in result.loss_history] == [STEPS], result.loss_history
    print("LOSS", name, result.loss_history[0][1], flush=True)
    np.testing.assert_allclose(result.loss_history[0][1], sharded[-1], rtol=2e-4, atol=2e-4)
    assert_params_close(model_dir, dirs["data4_model2"], name)

  # 3. (1, 8) cannot split 4 attention heads over `model`.
  model_dir = os.path.join(work_dir, "resumed_data1_model8")
  shutil.copytree(saved_dir, os.path.join(model_dir, "checkpoints", str(SAVED)))
  before = sorted(os.walk(model_dir))
  try:
    train("resumed_data1_model8", (1, 8))
  except partitioning.MeshDoesNotFitError as e:
    message = str(e)
  else:
    raise AssertionError("a (1, 8) mesh trained a model with 4 attention heads")
  assert "mesh (data=1, model=8)" in message, message
  assert "'heads', size 4) over model=8" in message, message
  assert sorted(os.walk(model_dir)) == before, "the failed resume wrote to MODEL_DIR"
print("OK", flush=True)
