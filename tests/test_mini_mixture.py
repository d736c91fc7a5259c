"""The offline mini mixture: generation, determinism, the seqio mixture through the PaLI
feature converter, and oracle evaluation. Uses the `tiny` config (648 examples, seconds)."""
import dataclasses
import importlib
import io
import os

import numpy as np
import PIL.Image
import pytest
import seqio
import tensorflow_datasets as tfds

import tasks
from omni_smola import data
from tasks import mini
from omni_smola.models.pix2struct_patches import Pix2StructPatching
from omni_smola.studies import mixtures as study_mixtures
from tasks.mini import banners
from tasks.mini import builder as mini_builder
from tasks.mini import photos
from tasks.mini import text as mini_text

LENGTHS = {"inputs": 16, "targets": 12}
IMAGE_SIZE = 32


@pytest.fixture(name="data_dir", scope="module")
def data_dir_fixture(tmp_path_factory):
  tfds.disable_progress_bar()
  directory = str(tmp_path_factory.mktemp("mini_data"))
  mini.prepare("tiny", data_dir=directory)
  yield directory
  mini.set_data_dir(None)


def _tfrecord_bytes(directory: str) -> dict[str, bytes]:
  root = os.path.join(directory, "mini_vl", "tiny", str(mini.MiniVl.VERSION))
  return {name: open(os.path.join(root, name), "rb").read()
          for name in sorted(os.listdir(root)) if ".tfrecord" in name}


def test_tiny_config_has_every_split_of_every_task(data_dir):
  splits = tfds.builder(mini.source.tfds_name("tiny"), data_dir=data_dir).info.splits
  for subtask in mini.SUBTASKS:
    assert splits[f"{subtask}_train"].num_examples == 40
    assert splits[f"{subtask}_validation"].num_examples == 16
    assert splits[f"{subtask}_test"].num_examples == 16


def test_full_config_is_tens_of_thousands_of_examples():
  config = mini_builder.FULL
  total = sum(config.num_examples(subtask, split) for subtask in mini.SUBTASKS
              for split in ("train", "validation", "test"))
  assert 30_000 <= total <= 60_000


def test_same_seed_gives_the_same_dataset_bytes(data_dir, tmp_path):
  mini.source.prepare_builder(tfds.builder(mini.source.tfds_name("tiny"),
                                           data_dir=str(tmp_path)))
  first, second = _tfrecord_bytes(data_dir), _tfrecord_bytes(str(tmp_path))
  assert len(first) == 27 and first == second


def test_another_seed_gives_other_examples():
  def answers(seed):
    config = dataclasses.replace(mini_builder.TINY, seed=seed)
    return [(s.question, s.answers) for s in mini_builder.samples(config, "shapes_count",
                                                                  "train")]
  assert answers(0) == answers(0)
  assert answers(0) != answers(1)


def test_mixture_batches_through_the_feature_converter(data_dir):
  del data_dir
  mixture = seqio.get_mixture_or_task("mini_generalist_tiny")
  ds = mixture.get_dataset(LENGTHS, split="train", shuffle=True, seed=0, num_epochs=1)
  converted = data.PaliFeatureConverter(image_size=IMAGE_SIZE)(ds, LENGTHS)
  batches = list(converted.batch(32).take(6).as_numpy_iterator())
  seen_tasks = set()
  for batch in batches:
    assert batch["image"].shape == (32, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() < 0 < batch["image"].max() <= 1.0
    assert batch["encoder_input_tokens"].shape == (32, LENGTHS["inputs"])
    targets = batch["decoder_target_tokens"]
    assert targets.shape == (32, LENGTHS["targets"])
    np.testing.assert_array_equal(batch["decoder_loss_weights"], (targets != 0).astype(np.int32))
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 0], 0)
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:], targets[:, :-1])
    assert ((targets == 1).sum(axis=1) == 1).all()  # every target ends with one EOS
    seen_tasks.update(data.task_name(i) for i in batch["task_id"])
  assert seen_tasks == {t.name for t in mixture.tasks}


def test_prompts_are_pali_style(data_dir):
  del data_dir
  vocab = data.get_vocabulary("mini")
  for name, prefix in (("mini_shapes_caption_tiny", "caption en"),
                       ("mini_shapes_color_qa_tiny", "answer en what")):
    ds = seqio.get_mixture_or_task(name).get_dataset(LENGTHS, split="validation",
                                                     shuffle=False)
    example = next(ds.as_numpy_iterator())
    assert vocab.decode(example["inputs"].tolist()).startswith(prefix)


def _oracle(ds):
  return [(index, ex["decoder_target_tokens"]) for index, ex in ds.as_numpy_iterator()]


@pytest.mark.parametrize("task_name", ["mini_shapes_count_tiny", "mini_text_read_tiny",
                                       "mini_banner_read_tiny"])
def test_evaluator_scores_oracle_predictions_100(data_dir, task_name):
  del data_dir
  evaluator = seqio.Evaluator(mixture_or_task_name=task_name, logger_cls=(),
                              feature_converter=data.PaliFeatureConverter(image_size=16),
                              eval_split="validation")
  scores = evaluator.evaluate(compute_metrics=True, predict_fn=_oracle)[0].result()[task_name]
  assert scores and all(value == pytest.approx(100.0) for value in scores.values())


def test_caption_targets_keep_every_reference(data_dir):
  del data_dir
  task = seqio.get_mixture_or_task("mini_photo_caption_tiny")
  example = next(task.get_dataset(LENGTHS, split="validation", shuffle=False)
                 .as_numpy_iterator())
  references = task.postprocess_fn(example["targets_pretokenized"], example=example,
                                   is_target=True)
  assert len(references) == 3
  assert example["targets_pretokenized"].decode() in references


def test_every_shipped_photo_loads_offline_with_its_recorded_aspect():
  for label, loader, captions in photos.CATALOGUE:
    image = loader()
    assert image.mode == "RGB" and min(image.size) >= 64, label
    width, height = image.size
    assert width / height == pytest.approx(photos.ASPECTS.get(label, 1.0), rel=0.02), label
    assert len(captions) == 3
  rendered = photos.render_photo("face", 3, (0.0, 0.0, 1.0, 1.0), True)
  assert rendered.shape == (64, 64, 3) and rendered.dtype == np.uint8


def test_data_dir_precedence(monkeypatch):
  explicit = mini.source._explicit_data_dir  # pylint: disable=protected-access
  # Whatever an earlier test in this process set (the trainer tests set seqio's override).
  monkeypatch.setattr(seqio.utils, "_TFDS_DATA_DIR_OVERRIDE", None)
  try:
    mini.set_data_dir(None)
    monkeypatch.delenv(mini.DATA_DIR_ENV, raising=False)
    assert mini.resolve_data_dir() is None  # TFDS's own default
    monkeypatch.setenv(mini.DATA_DIR_ENV, "/from/env")
    assert mini.resolve_data_dir() == "/from/env"
    seqio.utils.set_tfds_data_dir_override("/from/flag")
    assert mini.resolve_data_dir() == "/from/flag"
    mini.set_data_dir("/from/argument")
    assert mini.resolve_data_dir() == "/from/argument"
  finally:
    seqio.utils.set_tfds_data_dir_override(None)
    mini.set_data_dir(explicit)


def test_reimporting_the_registrations_does_not_raise():
  importlib.reload(tasks.mini)
  importlib.reload(tasks)
  assert "mini_generalist" in seqio.MixtureRegistry.names()
  names = {t.name for t in seqio.get_mixture_or_task("mini_generalist").tasks}
  assert len(names) == 9 and all(not n.endswith("_tiny") for n in names)


@pytest.mark.parametrize("config,subtasks", [(mini_builder.TINY, mini.SUBTASKS),
                                             (mini_builder.BANNERS_TINY, mini.BANNER_SUBTASKS)])
def test_shipped_vocabulary_covers_the_mixture_text(config, subtasks):
  vocab = data.get_vocabulary("mini")
  for subtask in subtasks:
    for sample in mini_builder.samples(config, subtask, "validation"):
      for text in (sample.question, *sample.answers):
        ids = vocab.encode(text)
        assert vocab.decode(ids) == text
        assert len(ids) <= 16, text


def test_rendered_images_are_64px_rgb():
  for subtask in mini.SUBTASKS:
    sample = next(iter(mini_builder.samples(mini_builder.TINY, subtask, "test")))
    image = sample.render()
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image.std() > 5, subtask  # something is drawn
    PIL.Image.fromarray(image)


def _ink_extent_at_model_size(image: np.ndarray) -> tuple[int, int]:
  """(rows, columns) spanned by pixels unlike the corner, after the model's resize."""
  resized = data.resize_and_normalize(image, (IMAGE_SIZE, IMAGE_SIZE)).numpy()
  ink = np.abs(resized - resized[0, 0]).max(-1) > 0.5
  rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
  return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


@pytest.mark.parametrize("subtask,min_rows", [("digits_qa", 20), ("text_read", 6)])
def test_digits_and_words_stay_legible_at_the_models_32px(subtask, min_rows):
  # Version 1.0.0 drew words 2-4 px tall and digits from 14 px at 32 px: no model,
  # specialist included, learned either (exact match at chance).
  for sample in mini_builder.samples(mini_builder.TINY, subtask, "validation"):
    rows, _ = _ink_extent_at_model_size(sample.render())
    assert rows >= min_rows, (subtask, sample.answers)


def test_a_spatial_answer_is_the_colour_drawn_on_the_side_the_question_names():
  """Read off the pixels: the answer colour's centroid lies on the named side of the
  other shape's, by at least the margin (mini_vl 1.2.0; the yes/no relations before it
  were never learned)."""
  from tasks.mini import common, shapes  # pylint: disable=g-import-not-at-top
  for sample in mini_builder.samples(mini_builder.TINY, "shapes_spatial_qa", "validation"):
    side = next(s for s in shapes.SIDES if f" {s} " in f" {sample.question[:-1]} ")
    axis, sign = shapes.SIDES[side]
    image = sample.render().astype(int)
    centroids = {}
    for name, rgb in common.COLORS.items():
      ys, xs = np.nonzero((np.abs(image - rgb).sum(-1) < 10))
      if len(xs) > 10:
        centroids[name] = {"x": xs.mean(), "y": ys.mean()}
    (answer,) = sample.answers
    assert len(centroids) == 2 and answer in centroids, (sample.question, centroids)
    other = next(c for c in centroids if c != answer)
    lead = sign * (centroids[answer][axis] - centroids[other][axis])
    assert lead >= shapes.SIDE_MARGIN - 2, (sample.question, answer, centroids)


def test_counts_run_to_four_and_cover_every_answer():
  answers = [int(s.answers[0]) for s in mini_builder.samples(mini_builder.FULL, "shapes_count",
                                                              "validation")]
  assert set(answers) == set(range(5))


def test_vl_tasks_never_cache_their_source_in_memory(data_dir):
  # seqio (under 10,000 examples) and TFDS (small unshuffled splits) cache on their own;
  # evaluation then reads `num_examples` of the cache, tf.data throws the partial cache
  # away and warns.
  task = seqio.get_mixture_or_task("mini_shapes_count_tiny")
  mixture = seqio.get_mixture_or_task("mini_generalist_tiny")
  assert isinstance(task, data.VLTask)
  datasets = {
      "task": task.get_dataset(LENGTHS, split="validation", shuffle=False, num_epochs=1),
      "task asked to cache": task.get_dataset(LENGTHS, split="validation", shuffle=False,
                                              num_epochs=1, try_in_mem_cache=True),
      "mixture": mixture.get_dataset(LENGTHS, split="train", shuffle=True, seed=0),
  }
  for name, dataset in datasets.items():
    graph = dataset._as_serialized_graph().numpy()  # pylint: disable=protected-access
    assert b"CacheDataset" not in graph, name
  rows = list(datasets["task"].take(3).as_numpy_iterator())
  assert len(rows) == 3 and all(row["targets"].size for row in rows)


def test_banners_are_their_own_dataset_and_only_the_studys_mixtures_read_them(data_dir):
  del data_dir
  builder = mini.prepare("tiny", builder=mini.MiniVlBanners)  # the data dir of the fixture
  splits = builder.info.splits
  assert [splits[f"banner_read_{s}"].num_examples for s in ("train", "validation", "test")] \
      == [40, 16, 16]
  assert builder.info.features["image"].shape == (None, None, 3)
  def task_names(mixture):
    return {t.name for t in seqio.get_mixture_or_task(mixture).tasks}
  assert "mini_banner_read_tiny" not in task_names("mini_generalist_tiny")
  assert task_names("mini_generalist_banners_tiny") == \
      task_names("mini_generalist_tiny") | {"mini_banner_read_tiny"}
  assert "mini_banner_read" in task_names("mini_text_digits_banners")
  assert study_mixtures.BANNER_SUBTASKS == ["banner_read"]


def test_a_banner_is_one_whole_word_32px_tall_and_two_to_four_times_as_wide():
  ratios = []
  for sample in mini_builder.samples(mini_builder.BANNERS_FULL, "banner_read", "validation"):
    image = sample.render()
    height, width, _ = image.shape
    assert height == banners.BANNER_HEIGHT and width % height == 0, image.shape
    ratios.append(width // height)
    (word,) = sample.answers
    assert word in mini_text.WORDS and sample.question in banners.QUESTIONS
    ink = np.abs(image.astype(int) - image[0, 0]).sum(-1) > 60
    columns = np.flatnonzero(ink.any(0))
    assert columns[0] > 0 and columns[-1] < width - 1, word  # not cut at either end
  assert set(ratios) == set(banners.ASPECT_RATIOS)


def test_a_banner_reaches_the_pix2struct_tower_at_its_own_shape(data_dir):
  """The mini MoME model's Pix2Struct-like tower (4 px patches, 64 of them) gets a grid of
  the banner's shape; the squashed image the ViTs read is square."""
  del data_dir
  patching = Pix2StructPatching(patch_size=4, max_patches=64, max_aspect_ratio=4.0)
  task = seqio.get_mixture_or_task("mini_banner_read_tiny")
  ds = task.get_dataset(LENGTHS, split="validation", shuffle=False, num_epochs=1)
  converter = data.PaliFeatureConverter(image_size=IMAGE_SIZE, pix2struct_patching=patching)
  grids = {}
  for example, converted in zip(ds.as_numpy_iterator(),
                                converter(ds, LENGTHS).as_numpy_iterator()):
    width, height = PIL.Image.open(io.BytesIO(example["image"][0])).size
    assert converted["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    grid = (converted["patch_row_ids"].max(), converted["patch_col_ids"].max())
    assert grids.setdefault(width // height, grid) == grid
  # Pix2Struct's scale: sqrt(64 * 4 * 4 / (32 * width)), floored per side.
  assert grids == {2: (5, 11), 3: (4, 13), 4: (4, 16)}
