"""Mixtures the studies add to the mini tasks, each also with the `_tiny` suffix (the
quick study's data). Listed in a study's `task_modules`.

* `mini_captions`: the captioning tasks alone, on which the mini study pretrains its RAW
  backbone (the paper's RAW checkpoint was pretrained without the fine-tuning mixture).
* `mini_photos_shapes` and `mini_text_digits`: the mixture split by what the image holds,
  scenes (photos, shapes) or characters (rendered words, handwritten digits re-drawn). The
  MoME study pretrains one vision tower on each, so the towers specialise as MoME's
  separately pretrained experts do. Together they are the nine tasks of `mini_generalist`,
  at its rates.
* `mini_generalist_banners` and `mini_text_digits_banners`: the same with `banner_read`
  added, the one task whose images are not square (words on banners 2-4 times as wide as
  tall, dataset mini_vl_banners). MoME's study trains and scores its arms on the first and
  pretrains its Pix2Struct-like tower, the one that reads an image at its own shape, on the
  second.
"""
from typing import Mapping, Sequence

from omni_smola.data import register_vl_mixture
from omni_smola.data.prompts import CAPTION_PROMPT
import tasks.mini

CAPTION_SUBTASKS = [s for s, kwargs in tasks.mini.TASK_KWARGS.items()
                    if kwargs["prompt"] is CAPTION_PROMPT]
PHOTOS_SHAPES_SUBTASKS = ["shapes_caption", "shapes_count", "shapes_color_qa",
                          "shapes_spatial_qa", "photo_caption", "photo_qa"]
TEXT_DIGITS_SUBTASKS = ["digits_qa", "text_read", "text_caption"]
BANNER_SUBTASKS = list(tasks.mini.BANNER_SUBTASKS)
assert sorted(PHOTOS_SHAPES_SUBTASKS + TEXT_DIGITS_SUBTASKS) == sorted(tasks.mini.SUBTASKS)


def _register(name: str, subtasks: Sequence[str], rates: Mapping[str, float]) -> None:
  """`name` and `name_tiny`: `subtasks` of the full and tiny configs at `rates`."""
  for config, suffix in tasks.mini.CONFIG_SUFFIXES.items():
    register_vl_mixture(f"{name}{suffix}",
                        {tasks.mini.task_name(s, config): rates[s] for s in subtasks})


_register("mini_captions", CAPTION_SUBTASKS, {s: 1.0 for s in CAPTION_SUBTASKS})
_register("mini_photos_shapes", PHOTOS_SHAPES_SUBTASKS, tasks.mini.DEFAULT_RATES)
_register("mini_text_digits", TEXT_DIGITS_SUBTASKS, tasks.mini.DEFAULT_RATES)
_register("mini_generalist_banners", list(tasks.mini.SUBTASKS) + BANNER_SUBTASKS,
          tasks.mini.DEFAULT_RATES)
_register("mini_text_digits_banners", TEXT_DIGITS_SUBTASKS + BANNER_SUBTASKS,
          tasks.mini.DEFAULT_RATES)
