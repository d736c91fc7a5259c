"""Pix2Struct's patches cut in the input pipeline from the unsquashed image (variable aspect
ratio): equal to transformers' processor (our numpy one), per example in one batch, read by
the MoME model in place of cutting the squashed PaLI image, recorded in the iterator's
position; bad input refused naming the example, the feature and the tower."""
import numpy as np
import pytest
import tensorflow as tf

from omni_smola import data, memory_plan
from omni_smola.model import PaliModel
from omni_smola.data import pix2struct_inputs
from omni_smola.models import configs
from omni_smola.models.pix2struct_patches import Pix2StructPatching, flatten_patches
from omni_smola.training import data_iterator, trainer

PATCHING = Pix2StructPatching(patch_size=4, max_patches=64, max_aspect_ratio=4.0)
LENGTHS = {"inputs": 8, "targets": 6}


@pytest.mark.parametrize("height,width", [(64, 64), (40, 120), (90, 36), (17, 50)])
def test_the_pipelines_cut_equals_the_processors(height, width):
  image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
  want = flatten_patches(image, patch_size=4, max_patches=64, max_aspect_ratio=4.0)
  got = pix2struct_inputs.flatten_patches(tf.constant(image), PATCHING, tf.constant("x"))
  np.testing.assert_array_equal(got["patch_row_ids"].numpy(), want.row_ids)
  np.testing.assert_array_equal(got["patch_col_ids"].numpy(), want.col_ids)
  np.testing.assert_allclose(got["flattened_patches"].numpy(), want.patches, atol=1e-4)
  # A grid with the image's aspect ratio, not the square a squashed image would get.
  rows, cols = want.row_ids.max(), want.col_ids.max()
  assert abs(np.log(cols / rows) - np.log(width / height)) < 0.35, (rows, cols)


def test_an_image_beyond_the_towers_aspect_ratio_stops_the_input_naming_the_example():
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"(?s)image_id=long.*10.*x.*50.*max_aspect_ratio=4\.0"):
    pix2struct_inputs.flatten_patches(tf.zeros((10, 50, 3), tf.uint8), PATCHING,
                                      tf.constant("image_id=long, question_id=q"))


def _examples(images):
  rows = [{"inputs": [5, 6, 1], "targets": [20, 21, 1], "task_id": [3], "image": image,
           "example_id": [f"image_id={i}, question_id=q"]} for i, image in enumerate(images)]
  signature = {"inputs": tf.TensorSpec([None], tf.int32),
               "targets": tf.TensorSpec([None], tf.int32),
               "task_id": tf.TensorSpec([1], tf.int32),
               "image": tf.TensorSpec([None, None, 3], tf.uint8),
               "example_id": tf.TensorSpec([1], tf.string)}
  return tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=signature)


def test_the_converter_adds_each_examples_own_grid_only_for_a_pix2struct_model():
  wide, tall = np.full((30, 90, 3), 200, np.uint8), np.full((80, 40, 3), 50, np.uint8)
  plain = next(data.PaliFeatureConverter(image_size=16)(_examples([wide]), LENGTHS)
               .as_numpy_iterator())
  assert not set(pix2struct_inputs.PATCH_FEATURES) & set(plain)
  converter = data.PaliFeatureConverter(image_size=16, pix2struct_patching=PATCHING)
  batch = next(converter(_examples([wide, tall]), LENGTHS).batch(2).as_numpy_iterator())
  assert batch["flattened_patches"].shape == (2, 64, 48)
  assert batch["image"].shape == (2, 16, 16, 3)  # the other towers' squashed image
  # What the memory plan budgets for is what the pipeline yields.
  assert {k: v.shape[1:] for k, v in batch.items()} == converter.model_feature_shapes(LENGTHS)
  grids = [(rows.max(), cols.max()) for rows, cols in
           zip(batch["patch_row_ids"], batch["patch_col_ids"])]
  assert grids[0][1] > grids[0][0] and grids[1][0] > grids[1][1], grids
  for i, image in enumerate((wide, tall)):
    want = flatten_patches(image, patch_size=4, max_patches=64, max_aspect_ratio=4.0)
    np.testing.assert_array_equal(batch["patch_row_ids"][i], want.row_ids)


def test_the_model_config_names_the_cut_and_refuses_towers_that_cut_differently():
  assert configs.CONFIGS["tiny_mome"].pix2struct_patching == Pix2StructPatching(4, 16, 4.0)
  assert configs.CONFIGS["tiny"].pix2struct_patching is None
  tiny = configs.CONFIGS["tiny_mome"]
  tower = dict(tiny.vision_towers)["pix2struct"]
  other = type(tower)(**{**tower.__dict__, "max_patches": 12})
  move = type(tiny.move)(**{**tiny.move.__dict__,
                            "tower_names": tiny.move.tower_names + ("pix2struct_b",)})
  twin = type(tiny)(text=tiny.text, vision=tiny.vision, move=move,
                    vision_towers=tiny.vision_towers + (("pix2struct_b", other),))
  with pytest.raises(ValueError, match="Pix2Struct towers cut their patches differently"):
    twin.pix2struct_patching  # pylint: disable=pointless-statement


def test_the_iterator_position_records_the_cut_and_a_changed_cut_is_a_changed_pipeline():
  cfg = data_iterator.DatasetConfig(mixture_or_task_name="m", task_feature_lengths=LENGTHS,
                                    split="train", batch_size=2, seed=0)
  fields = data_iterator.SHAPE_FIELDS
  before = data_iterator._now(cfg, 16, PATCHING)  # pylint: disable=protected-access
  assert before["pix2struct_patching"] == [4, 64, 4.0]
  assert not data_iterator.pipeline_changes(before, cfg, 16, fields, unrecorded_changed=True,
                                            pix2struct_patching=PATCHING)
  changed = data_iterator.pipeline_changes(before, cfg, 16, fields, unrecorded_changed=True,
                                           pix2struct_patching=PATCHING._replace(max_patches=32))
  assert changed == ["pix2struct_patching: [4, 64, 4.0] -> [4, 32, 4.0]"]
  # A checkpoint from before the field had no Pix2Struct patches: unchanged for a model
  # without the tower, changed for one with it.
  now = data_iterator._now(cfg, 16)  # pylint: disable=protected-access
  old = {k: v for k, v in now.items() if k != "pix2struct_patching"}
  assert not data_iterator.pipeline_changes(old, cfg, 16, fields, unrecorded_changed=True)
  assert data_iterator.pipeline_changes(old, cfg, 16, fields, unrecorded_changed=True,
                                        pix2struct_patching=PATCHING)


def test_the_trainer_feeds_the_mome_model_each_images_own_grid(tmp_path, monkeypatch):
  cfg = data_iterator.DatasetConfig("mp_strips", {"inputs": 8, "targets": 4}, batch_size=6,
                                    module="multidevice_checks.multiprocess_tasks")
  seen, next_batch = [], data_iterator.TrainBatches.__next__

  def recording(self):
    seen.append(next_batch(self))
    return seen[-1]

  monkeypatch.setattr(data_iterator.TrainBatches, "__next__", recording)
  result = trainer.train(model=PaliModel("tiny_mome"), model_dir=str(tmp_path / "run"),
                         train_steps=2, train_dataset_cfg=cfg,
                         # The tower trains from scratch (no checkpoint to fill it).
                         trainable_overrides=[("^vision_towers/pix2struct/", True)])
  assert result.step == 2, result
  tower = Pix2StructPatching(4, 16, 4.0)  # tiny_mome's
  grids = {(int(r.max()), int(c.max())) for batch in seen
           for r, c in zip(batch["patch_row_ids"], batch["patch_col_ids"])}
  want = {tuple(int(ids.max()) for ids in flatten_patches(
      np.zeros((16, 16 * w, 3)), patch_size=tower.patch_size, max_patches=tower.max_patches,
      max_aspect_ratio=tower.max_aspect_ratio)[1:]) for w in (1, 2, 3)}
  assert grids == want, (grids, want)  # 4 x 4, 2 x 5 and 2 x 6 (rows x columns)


def test_the_memory_plan_budgets_the_patches_of_a_mome_model():
  batch = memory_plan.abstract_batch(PaliModel("tiny_mome"), LENGTHS, batch_size=2)
  assert batch["flattened_patches"].shape == (2, 16, 48)  # tiny_mome: 16 patches of 4 px
  assert batch["patch_row_ids"].shape == batch["patch_col_ids"].shape == (2, 16)
  assert batch["image"].shape == (2, 16, 16, 3)


def test_infer_names_an_image_too_elongated_for_the_tower():
  from omni_smola import infer  # pylint: disable=g-import-not-at-top
  with pytest.raises(tf.errors.InvalidArgumentError) as error:
    pix2struct_inputs.flatten_patches(tf.zeros((10, 50, 3), tf.uint8), PATCHING,
                                      tf.constant("image_id=/tmp/long.png, question_id=q"))
  said = infer._unreadable_image(error.value.message)  # pylint: disable=protected-access
  assert said.startswith("--image: Pix2Struct patches: the image of example"), said
  assert "image_id=/tmp/long.png" in said and "max_aspect_ratio=4.0" in said, said
  assert "b'" not in said, said
