"""MoME's frozen towers start from real weights (VISION_TOWER_CHECKPOINTS), never silently random.

The tiny MoME model's Pix2Struct tower (`vision_towers/pix2struct`) is filled from a
transformers checkpoint (a random small `Pix2StructVisionModel` saved with `save_pretrained`)
or from one of our checkpoints; a frozen tower that nothing fills stops the trainer, naming the
tower and the checkpoint, before anything is compiled. No step runs here: shapes come from
`jax.eval_shape`.
"""
import jax
import numpy as np
import pytest
from flax import traverse_util

from omni_smola import param_layout
from omni_smola.checkpoints import hf_vision_towers
from omni_smola.checkpoints.restore import CheckpointMismatchError
from omni_smola.checkpoints.vision_tower_sources import TowerFill, TowerNotFilledError
from omni_smola.model import PaliModel
from omni_smola.models import configs
from omni_smola.training import checkpointing, data_iterator, trainer

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TOWER = dict(configs.CONFIGS["tiny_mome"].vision_towers)["pix2struct"]
TOWERS = dict(configs.CONFIGS["tiny_mome"].vision_towers)
TASKS_MODULE = "multidevice_checks.multiprocess_tasks"
PREFIX = "vision_towers/pix2struct/"


def _hf_tower(folder, width):
  torch.manual_seed(0)
  config = transformers.Pix2StructVisionConfig(
      hidden_size=width, num_hidden_layers=TOWER.depth, num_attention_heads=TOWER.num_heads,
      d_kv=TOWER.head_dim, d_ff=TOWER.mlp_dim, seq_len=TOWER.num_positions,
      patch_embed_hidden_size=TOWER.patch_size ** 2 * 3)
  transformers.Pix2StructVisionModel(config).save_pretrained(folder)
  return str(folder)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
  """(model, {name: zeros of its shape}, our checkpoint dir without the towers, HF tower dir)."""
  model = PaliModel("tiny_mome")
  shapes = trainer.input_shapes(model, data_iterator.DatasetConfig(
      "mp_mixture", {"inputs": 8, "targets": 4}))
  abstract = param_layout.unbox(jax.eval_shape(
      lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))["params"])
  zeros = {"/".join(k): np.zeros(v.shape, v.dtype)
           for k, v in traverse_util.flatten_dict(abstract).items()}
  backbone = str(tmp_path_factory.mktemp("backbone"))  # a backbone run: no tower, no MoVE
  checkpointer = checkpointing.RunCheckpointer(
      backbone, checkpointing.CheckpointConfig(use_async=False, export_adapters=False))
  kept = {k: v for k, v in zeros.items()
          if not k.startswith("vision_towers/") and not param_layout.is_adapter_path(k)}
  checkpointer.save(1, {"step": np.int32(1), "params": traverse_util.unflatten_dict(
      {tuple(k.split("/")): v for k, v in kept.items()}), "opt_state": {}},
                    {"batches_consumed": 1})
  checkpointer.close()
  return model, zeros, backbone, _hf_tower(tmp_path_factory.mktemp("hf_tower"), TOWER.width)


def _tree(flat):
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_a_transformers_tower_fills_its_parameters_and_nothing_else(setting):
  _, zeros, _, hf_dir = setting
  filled = _flat(TowerFill(TOWERS, {"pix2struct": hf_dir}).fill(_tree(zeros)))
  imported = hf_vision_towers.load_vision_tower(hf_dir, TOWER)
  assert {k for k in filled if k.startswith(PREFIX)} == {PREFIX + k for k in imported}
  for name, value in imported.items():
    np.testing.assert_array_equal(filled[PREFIX + name], value)
  assert all(not filled[k].any() for k in filled if not k.startswith(PREFIX))


def test_a_run_that_trained_the_tower_fills_it_from_its_model_dir(setting, tmp_path):
  _, zeros, _, hf_dir = setting
  trained = _flat(TowerFill(TOWERS, {"pix2struct": hf_dir}).fill(_tree(zeros)))
  checkpointer = checkpointing.RunCheckpointer(
      str(tmp_path), checkpointing.CheckpointConfig(use_async=False, export_adapters=False))
  # Saved under another tower name: read back through (path, subtree).
  renamed = {k.replace(PREFIX, "vision_towers/photos/"): v for k, v in trained.items()}
  checkpointer.save(2, {"step": np.int32(2), "params": _tree(renamed), "opt_state": {}},
                    {"batches_consumed": 2})
  checkpointer.close()
  fill = TowerFill(TOWERS, {"pix2struct": (str(tmp_path), "vision_towers/photos")},
                   checkpointing.resolve_checkpoint)
  filled = _flat(fill.fill(_tree(zeros)))
  for name in trained:
    if name.startswith(PREFIX):
      np.testing.assert_array_equal(filled[name], trained[name])
  with pytest.raises(TowerNotFilledError, match=r"'pix2struct'.*holds nothing under "
                     r"vision_towers/pix2struct/.*vision_towers/photos"):
    TowerFill(TOWERS, {"pix2struct": str(tmp_path)}, checkpointing.resolve_checkpoint)


def test_bad_tower_sources_fail_naming_the_field_and_values(setting, tmp_path):
  wide = _hf_tower(tmp_path / "wide", TOWER.width + 4)
  with pytest.raises(ValueError, match=rf"width={TOWER.width} does not match .*wide.* is "
                     rf"{TOWER.width + 4}"):
    TowerFill(TOWERS, {"pix2struct": wide})
  with pytest.raises(ValueError, match=r"names tower 'dinov2', which the model does not have"):
    TowerFill(TOWERS, {"dinov2": wide})
  with pytest.raises(ValueError, match=r"VISION_TOWER_CHECKPOINTS\['pix2struct'\] = 3"):
    TowerFill(TOWERS, {"pix2struct": 3})


def _train(model, tmp_path, **kwargs):
  return trainer.train(
      model=model, model_dir=str(tmp_path / "run"), train_steps=1,
      train_dataset_cfg=data_iterator.DatasetConfig(
          "mp_mixture", {"inputs": 8, "targets": 4}, batch_size=2, module=TASKS_MODULE),
      checkpoint_cfg=checkpointing.CheckpointConfig(use_async=False), **kwargs)


def test_the_trainer_refuses_a_frozen_tower_that_nothing_fills(setting, tmp_path):
  model, _, backbone, _ = setting
  with pytest.raises(TowerNotFilledError, match=rf"vision tower 'pix2struct' is frozen .*"
                     rf"INITIAL_CHECKPOINT_PATH {backbone} holds no {PREFIX}.*"
                     r"VISION_TOWER_CHECKPOINTS = \{'pix2struct'"):
    _train(model, tmp_path, initial_checkpoint_path=backbone)
  with pytest.raises(TowerNotFilledError, match="no INITIAL_CHECKPOINT_PATH is given"):
    _train(model, tmp_path)


def test_the_check_passes_for_a_filled_or_a_trained_tower(setting):
  model, zeros, _, hf_dir = setting
  abstract = _tree({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in zeros.items()})
  backbone = [k for k in zeros if not k.startswith("vision_towers/")]
  for mode, sources, held in (("full", None, backbone), ("adapters", None, list(zeros)),
                              ("adapters", {"pix2struct": hf_dir}, backbone)):
    mask = {"/".join(k): v for k, v in traverse_util.flatten_dict(
        model.trainable_mask(abstract, mode)).items()}
    TowerFill(TOWERS, sources).check_filled(mask, lambda n: not mask[n], held, "ckpt")
  # The filled tower is checked whole: a source that misses a parameter is named.
  fill = TowerFill(TOWERS, {"pix2struct": hf_dir})
  fill.arrays.pop(sorted(fill.arrays)[0])
  with pytest.raises(CheckpointMismatchError, match=r"missing: vision_towers/pix2struct/"):
    fill.fill(_tree(zeros))
