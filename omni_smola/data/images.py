"""Image decoding and normalisation for vision-language examples.

Images travel through a task, its shuffle buffer and the mixture still encoded, and are
decoded in the feature converter: seqio shuffles after every task preprocessor, so decoding
in the task would keep a thousand full-size decoded images per task in memory (a DocVQA
page is ~10 MB decoded, ~200 kB encoded).

* `decode_image`: encoded JPEG/PNG/GIF/BMP/WebP bytes -> uint8 [h, w, 3]; grey becomes RGB
  and alpha is dropped. An unreadable image is reported with the task and example that hold
  it; a bare graph-mode decode fails deep inside tf.data with no hint of which of a million
  records is broken. Files that look whole are decoded in graph mode (full speed); only the
  others pay for `tf.py_function`, which can name the example.
* `drop_unreadable_images`: a task preprocessor for tasks registered with
  on_corrupt_image="skip"; drops (and counts) examples whose image does not decode.
* `apply_corrupt_image_policy`: every task's preprocessor that applies its policy, the
  registered one or gin's `on_corrupt_image.by_task` (read when a dataset is built, as
  prompts read their style); `check_corrupt_image_overrides` refuses an override that
  names a task the run does not use (it would change nothing).
* `resize_and_normalize`: uint8 [h, w, 3] -> float32 [H, W, 3] in [-1, 1].
"""
from __future__ import annotations

import collections
import re
import threading
from typing import Iterable, Mapping, Optional, Sequence

from absl import logging
import gin
import tensorflow as tf

ON_CORRUPT_RAISE = "raise"
ON_CORRUPT_SKIP = "skip"


class CorruptImageError(ValueError):
  """An example's image bytes cannot be decoded."""


_skip_counts: collections.Counter = collections.Counter()
_skip_counts_lock = threading.Lock()


def skipped_image_counts() -> dict[str, int]:
  """Number of examples dropped for unreadable images so far, per task (this process)."""
  with _skip_counts_lock:
    return dict(_skip_counts)


def reset_skipped_image_counts() -> None:
  with _skip_counts_lock:
    _skip_counts.clear()


def example_description(image_id: tf.Tensor, question_id: tf.Tensor) -> tf.Tensor:
  """The string that names an example in error messages."""
  return tf.strings.join(["image_id=", image_id, ", question_id=", question_id])


def _task_label(task_id) -> str:
  from omni_smola.data import task_ids  # pylint: disable=g-import-not-at-top
  try:
    return repr(task_ids.task_name(int(task_id)))
  except KeyError:
    return f"with task_id {int(task_id)}"


def _try_decode(encoded: tf.Tensor):
  """(uint8 [h, w, 3], None) or (None, error message)."""
  try:
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
  except tf.errors.OpError as error:
    # Keep TensorFlow's reason, not its "{{function_node ...}} ... [Op:DecodeImage]" framing.
    reason = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message)
    return None, re.sub(r"\s*\[Op:\w+\].*$", "", reason, flags=re.S).strip()
  if tf.size(image) == 0:
    return None, "the image has no pixels"
  return image, None


def _decode_or_raise(encoded, description, task_id):
  image, error = _try_decode(encoded)
  if error is not None:
    raise CorruptImageError(
        f"Task {_task_label(task_id)}: the image of example ({description.numpy().decode()}) "
        f"cannot be decoded: {error}. Fix or remove the record, or register the task with "
        "on_corrupt_image='skip'.")
  return image


def _slice(data: tf.Tensor, start, length: int) -> tf.Tensor:
  """data[start:start + length] as bytes, empty when out of range (never raises)."""
  size = tf.strings.length(data)
  start = tf.clip_by_value(tf.cast(start, tf.int32), 0, size)
  return tf.strings.substr(data, start, length)


def looks_complete(encoded: tf.Tensor) -> tf.Tensor:
  """Whether `encoded` opens with an image signature and (JPEG/PNG/GIF) closes properly.

  Graph ops only, cheap, never raising. Wrong formats, empty and truncated files fail it;
  a valid file can fail it too (a JPEG with bytes after its end marker), which only sends
  it down the slower, checked path.
  """
  size = tf.strings.length(encoded)
  head = _slice(encoded, 0, 8)
  jpeg = tf.logical_and(tf.equal(_slice(head, 0, 3), b"\xff\xd8\xff"),
                        tf.equal(_slice(encoded, size - 2, 2), b"\xff\xd9"))
  png = tf.logical_and(tf.equal(head, b"\x89PNG\r\n\x1a\n"),
                       tf.equal(_slice(encoded, size - 12, 12),
                                b"\x00\x00\x00\x00IEND\xaeB`\x82"))
  gif = tf.logical_and(tf.equal(_slice(head, 0, 4), b"GIF8"),
                       tf.equal(_slice(encoded, size - 1, 1), b";"))
  webp = tf.logical_and(tf.equal(_slice(head, 0, 4), b"RIFF"),
                        tf.equal(_slice(encoded, 8, 4), b"WEBP"))
  bmp = tf.equal(_slice(head, 0, 2), b"BM")
  return tf.reduce_any(tf.stack([jpeg, png, gif, webp, bmp]))


def decode_image(encoded: tf.Tensor, description: tf.Tensor, task_id: tf.Tensor) -> tf.Tensor:
  """Encoded bytes (scalar tf.string) -> uint8 [h, w, 3]; raises CorruptImageError.

  Images that pass `looks_complete` are decoded by the graph op at full tf.data speed; the
  rest go through `tf.py_function`, which decodes them if it can and otherwise raises an
  error naming the task and the example. Damage inside a well-framed file (a corrupt PNG
  chunk) still surfaces, unnamed, as TensorFlow's own decode error.

  Args:
    encoded: the image file's bytes.
    description: names the example in the error (see `example_description`).
    task_id: the example's task id, to name its task in the error.
  """
  def fast():
    return tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)

  def checked():
    image = tf.py_function(_decode_or_raise, [encoded, description, task_id], tf.uint8)
    image.set_shape([None, None, 3])
    return image

  image = tf.cond(looks_complete(encoded), fast, checked)
  image.set_shape([None, None, 3])
  return image


def drop_unreadable_images(dataset: tf.data.Dataset, *, task_name: str) -> tf.data.Dataset:
  """Drops examples whose `image` (encoded, shape [1]) cannot be decoded; logs and counts.

  The check decodes each image once more than a task that raises would, so it is opt-in.
  """
  def readable(encoded, description):
    _, error = _try_decode(encoded)
    if error is None:
      return True
    with _skip_counts_lock:
      _skip_counts[task_name] += 1
      count = _skip_counts[task_name]
    logging.warning("Task %r: skipping example (%s), its image cannot be decoded: %s "
                    "(%d skipped so far in this task)", task_name,
                    description.numpy().decode(), error, count)
    return False

  def keep(example):
    ok = tf.py_function(readable, [example["image"][0], example["example_id"][0]], tf.bool)
    ok.set_shape([])
    return ok

  return dataset.filter(keep)


@gin.configurable(module="omni_smola.data")
def on_corrupt_image(by_task: Optional[Mapping[str, str]] = None) -> dict[str, str]:
  """{task: 'raise' | 'skip'}: policies that replace the tasks' registered ones.

      omni_smola.data.on_corrupt_image.by_task = {'textcaps': 'skip'}
  """
  by_task = by_task or {}
  for task, policy in by_task.items():
    if policy not in (ON_CORRUPT_RAISE, ON_CORRUPT_SKIP):
      raise ValueError(f"on_corrupt_image.by_task[{task!r}] must be {ON_CORRUPT_RAISE!r} or "
                       f"{ON_CORRUPT_SKIP!r}, got {policy!r}")
  return dict(by_task)


def check_corrupt_image_overrides(task_names: Iterable[str]) -> None:
  """Raises naming each overridden task that is not among `task_names` (a no-op binding)."""
  used = set(task_names)
  unused = sorted(set(on_corrupt_image()) - used)
  if unused:
    raise ValueError(f"on_corrupt_image.by_task names {unused}, which this run neither trains "
                     f"nor evaluates on (its tasks: {sorted(used)}): the binding would change "
                     "nothing")


def apply_corrupt_image_policy(dataset: tf.data.Dataset, *, task_name: str,
                               registered: str) -> tf.data.Dataset:
  """The task's preprocessor for unreadable images: gin's override, else `registered`.

  'skip' drops and counts them here (`drop_unreadable_images`); 'raise' leaves them to
  the feature converter, whose decode names the task and the example.
  """
  policy = on_corrupt_image().get(task_name, registered)
  if policy == ON_CORRUPT_SKIP:
    return drop_unreadable_images(dataset, task_name=task_name)
  return dataset


def resize_and_normalize(image: tf.Tensor, image_size: Sequence[int]) -> tf.Tensor:
  """uint8 [h, w, 3] -> float32 [H, W, 3] in [-1, 1] (bilinear, antialiased, no aspect)."""
  height, width = image_size
  image = tf.cast(image, tf.float32)
  image = tf.image.resize(image, [height, width], method="bilinear", antialias=True)
  # Antialiased bilinear cannot overshoot, but float rounding can leave 255.00002.
  image = tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)
  image.set_shape([height, width, 3])
  return image
