"""`mini_vl`: the offline multi-task vision-language benchmark, as TFDS builders.

`mini_vl` holds the nine tasks of the mini mixture, with 64x64 PNG images; `mini_vl_banners`
holds `banner_read`, whose images are wide (tasks/mini/banners.py). It is a dataset of its
own so that `mini_vl` 1.2.0, its fixed image shape and every result trained on it stand.
Each has two configs (`full`: ~41k / 5k training examples, `tiny`: 72 per task for tests)
and one split per (task, train|validation|test), e.g. `shapes_count_validation`. Examples
follow the contract of every VL source (see omni_smola/data/preprocessors.py). Everything
is drawn from `config.seed`: the same seed gives the same records, byte for byte.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from tasks.mini import banners
from tasks.mini import digits
from tasks.mini import photos
from tasks.mini import shapes
from tasks.mini import text
from tasks.mini.common import IMAGE_SIZE, SPLITS, Sample, png_bytes, split_rng

SampleFn = Callable[[np.random.Generator, int, str], Iterator[Sample]]


def _ignore_split(fn) -> SampleFn:
  return lambda rng, count, split: fn(rng, count)


# Sub-task -> sample generator. The seqio task of sub-task X is `mini_X` (`mini_X_tiny`).
SUBTASKS: dict[str, SampleFn] = {
    "shapes_caption": _ignore_split(shapes.caption_samples),
    "shapes_count": _ignore_split(shapes.count_samples),
    "shapes_color_qa": _ignore_split(shapes.color_samples),
    "shapes_spatial_qa": _ignore_split(shapes.spatial_samples),
    "digits_qa": digits.digit_samples,
    "photo_caption": photos.photo_caption_samples,
    "photo_qa": photos.photo_qa_samples,
    "text_read": _ignore_split(text.text_read_samples),
    "text_caption": _ignore_split(text.text_caption_samples),
}
# The sub-tasks of `mini_vl_banners`: images of their own shape, not in `mini_generalist`.
BANNER_SUBTASKS: dict[str, SampleFn] = {
    "banner_read": _ignore_split(banners.banner_read_samples),
}


@dataclasses.dataclass(eq=False)
class MiniVlConfig(tfds.core.BuilderConfig):
  """Examples per (sub-task, split), and the seed everything is drawn from."""
  train_examples: tuple[tuple[str, int], ...] = ()
  validation_examples: int = 0
  test_examples: int = 0
  seed: int = 0

  def num_examples(self, subtask: str, split: str) -> int:
    if split == "train":
      return dict(self.train_examples)[subtask]
    return self.validation_examples if split == "validation" else self.test_examples


FULL_TRAIN_EXAMPLES = (
    ("shapes_caption", 6000), ("shapes_count", 6000), ("shapes_color_qa", 5000),
    ("shapes_spatial_qa", 6000), ("digits_qa", 4000), ("photo_caption", 3000),
    ("photo_qa", 3000), ("text_read", 5000), ("text_caption", 3000),
)
FULL = MiniVlConfig(name="full", description="~41k training examples, 500 per eval split.",
                    train_examples=FULL_TRAIN_EXAMPLES, validation_examples=500,
                    test_examples=500)
TINY = MiniVlConfig(name="tiny", description="For tests: 40 / 16 / 16 examples per task.",
                    train_examples=tuple((name, 40) for name in SUBTASKS),
                    validation_examples=16, test_examples=16)
BANNERS_FULL = MiniVlConfig(name="full", description="5k training examples, 500 per eval split.",
                            train_examples=(("banner_read", 5000),), validation_examples=500,
                            test_examples=500)
BANNERS_TINY = MiniVlConfig(name="tiny", description="For tests: 40 / 16 / 16 examples.",
                            train_examples=(("banner_read", 40),), validation_examples=16,
                            test_examples=16)


def split_name(subtask: str, split: str) -> str:
  return f"{subtask}_{split}"


def samples(config: MiniVlConfig, subtask: str, split: str) -> Iterator[Sample]:
  """The unrendered samples of one split, in order (the SentencePiece script reads these)."""
  rng = split_rng(config.seed, subtask, split)
  return BUILDERS[subtask].SAMPLE_FNS[subtask](rng, config.num_examples(subtask, split), split)


def examples(config: MiniVlConfig, subtask: str, split: str) -> Iterator[tuple[str, dict]]:
  """(key, contract example) pairs of one split, rendered."""
  for index, sample in enumerate(samples(config, subtask, split)):
    key = f"{subtask}/{split}/{index:06d}"
    image_id = f"{key}/{sample.image_key}" if sample.image_key else key
    yield key, {
        "image": png_bytes(sample.render()),
        "image_id": image_id,
        "question_id": key,
        "question": sample.question,
        "answers": list(sample.answers),
        "answer_type": sample.answer_type,
    }


def features(image_shape: tuple) -> tfds.features.FeaturesDict:
  """The contract's fields; `image_shape` (None for a free side) is the PNG's."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=image_shape, encoding_format="png"),
      "image_id": tfds.features.Text(),
      "question_id": tfds.features.Text(),
      "question": tfds.features.Text(),
      "answers": tfds.features.Sequence(tfds.features.Text()),
      "answer_type": tfds.features.Text(),
  })


class _MiniSplits:
  """What both builders do: a split per (sub-task, split) of `SAMPLE_FNS`, of `examples`."""
  SAMPLE_FNS: dict[str, SampleFn]
  IMAGE_SHAPE: tuple

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(description=(self.__doc__ or "").strip(),
                                          features=features(self.IMAGE_SHAPE),
                                          supervised_keys=None)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split_name(subtask, split): self._generate_examples(subtask, split)
            for subtask in self.SAMPLE_FNS for split in SPLITS}

  def _generate_examples(self, subtask: str, split: str):
    yield from examples(self.builder_config, subtask, split)


class MiniVl(_MiniSplits, tfds.core.GeneratorBasedBuilder):
  """Offline mini VL benchmark: shapes, digits, photos and rendered text (see tasks/mini)."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "Nine tasks over shapes, digits, photographs and text.",
                   "1.1.0": "Digits and text legible at the mini model's 32 px (see digits.py, "
                            "text.py): both were at chance.",
                   "1.2.0": "Counting (up to four shapes, all or one colour's) and spatial "
                            "questions (the colour of the shape on one side) a model can "
                            "learn (see shapes.py): both were at chance."}
  BUILDER_CONFIGS = [FULL, TINY]
  SAMPLE_FNS = SUBTASKS
  IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)


class MiniVlBanners(_MiniSplits, tfds.core.GeneratorBasedBuilder):
  """Offline mini VL benchmark: words on banners 2-4 times as wide as tall (tasks/mini)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Reading one word on a 32 px banner of aspect ratio 2, 3 or 4."}
  BUILDER_CONFIGS = [BANNERS_FULL, BANNERS_TINY]
  SAMPLE_FNS = BANNER_SUBTASKS
  IMAGE_SHAPE = (None, None, 3)


# Sub-task -> the builder whose dataset holds it.
BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    **{subtask: MiniVl for subtask in SUBTASKS},
    **{subtask: MiniVlBanners for subtask in BANNER_SUBTASKS},
}
