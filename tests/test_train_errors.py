"""Bad input fails before anything is written, with a message that says what is wrong."""
import os
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice_checks"))
import train_common  # noqa: E402

train_common.enable_compilation_cache()

import gin  # noqa: E402
import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from omni_smola import launching, param_layout  # noqa: E402
from omni_smola.checkpoints.restore import CheckpointMismatchError  # noqa: E402
from omni_smola.training import data_iterator, partitioned_step, trainer  # noqa: E402


from run_fixtures import clean_gin, data_dir  # noqa: E402,F401  (pytest fixtures)


def test_unknown_task_exits_1_listing_the_registered_ones_and_writes_nothing(
    tmp_path, data_dir):
  model_dir = tmp_path / "run"
  result = train_common.run_binary("train", data_dir, MODEL_DIR=str(model_dir), TRAIN_STEPS=2,
                                   MIXTURE_OR_TASK_NAME="mini_generalst")
  assert result.returncode == 1, result.stderr[-2000:]
  assert "no seqio task or mixture is registered as 'mini_generalst'" in result.stderr
  assert "mini_generalist" in result.stderr and "mini_shapes_count" in result.stderr
  assert "Traceback" not in result.stderr
  assert not model_dir.exists()


def test_gin_typos_name_the_binding(tmp_path, data_dir):
  with pytest.raises(launching.GinConfigError, match="trian_steps"):
    train_common.configure(str(tmp_path), data_dir, TRAIN_STEPS=2,
                           **{"omni_smola.training.trainer.train.trian_steps": 3})
  gin.clear_config()
  with pytest.raises(launching.GinConfigError, match="TRAIN_STEP .*did you mean TRAIN_STEPS"):
    train_common.configure(str(tmp_path), data_dir, TRAIN_STEPS=2, TRAIN_STEP=3)
  gin.clear_config()
  with pytest.raises(launching.GinConfigError, match="not found"):
    train_common.configure(str(tmp_path), data_dir, ["models/tiny.gin", "runs/generalst.gin"])


def test_missing_model_dir_is_reported_by_its_macro_name(data_dir):
  with pytest.raises(SystemExit, match="MODEL_DIR is required and not set: pass "
                     "--gin.MODEL_DIR="):
    launching.exit_on_user_error(lambda: train_common.configure(None, data_dir, TRAIN_STEPS=2))
  with pytest.raises(trainer.MissingSettingError, match="MODEL_DIR is not set"):
    trainer.train(model=None, model_dir="", train_dataset_cfg=None, train_steps=1)


def test_missing_initial_checkpoint_names_the_path_and_writes_nothing(tmp_path, data_dir):
  model_dir = tmp_path / "run"
  train_common.configure(str(model_dir), data_dir, TRAIN_STEPS=2,
                         INITIAL_CHECKPOINT_PATH=str(tmp_path / "no_backbone"))
  with pytest.raises(FileNotFoundError, match="does not exist: .*no_backbone"):
    trainer.train()
  assert not model_dir.exists()


def _zero_params_of_the_configured_model():
  """Zeros shaped like the parameters of gin's `train.model` (tiny shapes, no init)."""
  model = gin.query_parameter("train.model").scoped_configurable_fn()
  abstract = partitioned_step.abstract_variables(
      model, {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4),
              "image": (1, 16, 16, 3)})
  return jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype),
                                param_layout.unbox(abstract["params"]))


def _save_backbone(checkpoint, params):
  """`params` without their adapters, as an Orbax backbone checkpoint at `checkpoint`."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(checkpoint, {"params": _without_adapters(params)})
  return checkpoint


def test_a_checkpoint_that_does_not_fit_names_the_parameter_and_both_shapes(
    tmp_path, data_dir):
  # A backbone whose embedding has 512 rows (the tiny config's own vocabulary) while the
  # model, configured for the mini vocabulary, has 1024.
  train_common.configure(str(tmp_path / "run"), data_dir, TRAIN_STEPS=2)
  backbone = _zero_params_of_the_configured_model()
  backbone["text"]["token_embedder"]["embedding"] = np.zeros((512, 32), np.float32)
  checkpoint = _save_backbone(tmp_path / "backbone", backbone)
  gin.clear_config()
  model_dir = tmp_path / "run"
  train_common.configure(str(model_dir), data_dir, TRAIN_STEPS=2,
                         INITIAL_CHECKPOINT_PATH=str(checkpoint))
  with pytest.raises(CheckpointMismatchError,
                     match=r"text/token_embedder/embedding: checkpoint \(512, 32\) vs model "
                     r"\(1024, 32\)"):
    trainer.train()
  assert not model_dir.exists()


def test_a_specialist_from_a_backbone_only_checkpoint_is_refused_naming_what_is_missing(
    tmp_path, data_dir):
  # The generalist's adapter is frozen in a specialist run: from a checkpoint without it,
  # it would stay at its initialisation (B = 0) and the "generalist" would add nothing.
  train_common.configure(str(tmp_path / "unused"), data_dir, TRAIN_STEPS=2)
  backbone = _zero_params_of_the_configured_model()
  checkpoint = _save_backbone(tmp_path / "backbone", backbone)
  gin.clear_config()
  model_dir = tmp_path / "specialist"
  train_common.configure(
      str(model_dir), data_dir,
      ("models/tiny.gin", "adapters/omni_smola.gin", "runs/specialist.gin"),
      TRAIN_STEPS=2, INITIAL_CHECKPOINT_PATH=str(checkpoint))
  with pytest.raises(CheckpointMismatchError) as error:
    trainer.train()
  message = str(error.value)
  assert str(checkpoint) in message and "keeps frozen" in message, message
  first = re.search(r"first (\S+):", message).group(1)
  assert "/adapter/" in first and first.startswith(("img/", "text/")), first
  assert not model_dir.exists()


def test_batch_size_must_divide_over_the_data_parallel_devices():
  with pytest.raises(ValueError, match="BATCH_SIZE=6 is not divisible by the data-parallel"):
    data_iterator.check_batch_size(6, 4)


def _without_adapters(tree):
  if not isinstance(tree, dict):
    return tree
  return {k: _without_adapters(v) for k, v in tree.items() if k != "adapter"}
