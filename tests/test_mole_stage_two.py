"""MoME's stage 2 in a run: `train.mole_experts_from_single_adapter` starts every MoLE expert
from the stage-1 run's single adapter (INITIAL_CHECKPOINT_PATH), and refuses what would not.

The trainer runs up to its initial restore on the tiny MoME model (shapes from
`jax.eval_shape`, nothing compiled): the restored parameters are checked, then the run stops.
"""
import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util

from omni_smola import param_layout
from omni_smola.checkpoints.restore import CheckpointMismatchError
from omni_smola.model import PaliModel
from omni_smola.models import configs
from omni_smola.nn.mome_mole import EXPERT_PARAMS
from omni_smola.training import checkpointing, data_iterator, trainer

TASKS_MODULE = "multidevice_checks.multiprocess_tasks"
DATASET = data_iterator.DatasetConfig("mp_mixture", {"inputs": 8, "targets": 4}, batch_size=2,
                                      module=TASKS_MODULE)
STAGE_TWO = configs.CONFIGS["tiny_mome"]
EXPERTS = STAGE_TWO.text.mome_mole.num_experts


def _with_experts(num_experts):
  text = dataclasses.replace(STAGE_TWO.text, mome_mole=dataclasses.replace(
      STAGE_TWO.text.mome_mole, num_experts=num_experts))
  return PaliModel(dataclasses.replace(STAGE_TWO, text=text))


def _random_run(model, directory, seed):
  """A run directory holding one checkpoint of `model` with random parameters; {path: value}."""
  shapes = trainer.input_shapes(model, DATASET)
  abstract = param_layout.unbox(jax.eval_shape(
      lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))["params"])
  rng = np.random.default_rng(seed)
  flat = {"/".join(k): rng.normal(size=v.shape).astype(v.dtype)
          for k, v in traverse_util.flatten_dict(abstract).items()}
  checkpointer = checkpointing.RunCheckpointer(
      str(directory), checkpointing.CheckpointConfig(use_async=False, export_adapters=False))
  params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  checkpointer.save(1, {"step": np.int32(1), "opt_state": {}, "params": params},
                    {"batches_consumed": 1})
  checkpointer.close()
  return flat


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
  directory = tmp_path_factory.mktemp("stage_one")
  return str(directory), _random_run(_with_experts(1), directory, seed=1)


class _Restored(Exception):
  pass


def _initial_params(monkeypatch, tmp_path, model, **kwargs):
  """What the trainer restores as its initial parameters ({path: value}); stops it there."""
  restore, restored = checkpointing.restore_params, []

  def restore_and_stop(*args, **kw):
    restored.append(restore(*args, **kw))
    raise _Restored()

  monkeypatch.setattr(checkpointing, "restore_params", restore_and_stop)
  with pytest.raises(_Restored):
    trainer.train(model=model, model_dir=str(tmp_path / "run"), train_steps=1,
                  train_dataset_cfg=DATASET, **kwargs)
  params, = restored
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def test_every_expert_starts_as_the_stage_one_adapter(stage_one, monkeypatch, tmp_path):
  directory, single = stage_one
  params = _initial_params(monkeypatch, tmp_path, PaliModel(STAGE_TWO),
                           initial_checkpoint_path=directory,
                           mole_experts_from_single_adapter=True)
  moles = sorted({k.rsplit("/", 1)[0] for k in params if k.endswith("/mome_mole/down_kernel")})
  assert len(moles) == STAGE_TWO.text.num_encoder_layers + STAGE_TWO.text.num_decoder_layers
  for mole in moles:
    for name in EXPERT_PARAMS:
      value, source = params[f"{mole}/{name}"], single[f"{mole}/{name}"]
      assert value.shape == (EXPERTS,) + source.shape[1:]
      for expert in range(EXPERTS):
        np.testing.assert_array_equal(value[expert], source[0])
    # The router is new in stage 2: initialised, not read (stage 1 had none).
    assert not any(k.startswith(f"{mole}/router/") for k in single)
    assert f"{mole}/router/hidden/kernel" in params
  for name, value in single.items():  # everything else (MoVE, towers, backbone) is loaded
    if "/mome_mole/" not in name:
      np.testing.assert_array_equal(params[name], value, err_msg=name)


def test_without_the_setting_a_single_expert_checkpoint_is_a_shape_mismatch(
    stage_one, monkeypatch, tmp_path):
  directory, _ = stage_one
  with pytest.raises(CheckpointMismatchError, match=r"mome_mole/down_kernel.*\(1, "):
    _initial_params(monkeypatch, tmp_path, PaliModel(STAGE_TWO),
                    initial_checkpoint_path=directory)


def test_what_stage_two_cannot_start_from_fails_naming_it(stage_one, tmp_path):
  directory, _ = stage_one
  setting = "mole_experts_from_single_adapter = True"
  with pytest.raises(ValueError, match=rf"{setting} needs the stage-1 run as "
                     "INITIAL_CHECKPOINT_PATH"):
    trainer.train(model=PaliModel(STAGE_TWO), model_dir=str(tmp_path / "a"), train_steps=1,
                  train_dataset_cfg=DATASET, mole_experts_from_single_adapter=True)
  with pytest.raises(ValueError, match=rf"{setting} .*mome_mole is "
                     r"BottleneckMoLEConfig\(num_experts=1, .*num_experts >= 2"):
    trainer.train(model=_with_experts(1), model_dir=str(tmp_path / "b"), train_steps=1,
                  train_dataset_cfg=DATASET, initial_checkpoint_path=directory,
                  mole_experts_from_single_adapter=True)
  # A checkpoint whose MoLE already has K experts is not a stage-1 run.
  many = tmp_path / "many"
  _random_run(PaliModel(STAGE_TWO), many, seed=2)
  with pytest.raises(CheckpointMismatchError, match=rf"many: .*/mome_mole/down_bias: the single "
                     rf"adapter has shape \({EXPERTS}, .*{setting.split(' =')[0]}"):
    trainer.train(model=PaliModel(STAGE_TWO), model_dir=str(tmp_path / "c"), train_steps=1,
                  train_dataset_cfg=DATASET, initial_checkpoint_path=str(many),
                  mole_experts_from_single_adapter=True)
