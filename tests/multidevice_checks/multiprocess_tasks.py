"""Two tiny synthetic VL tasks for the multi-process training and routing-analysis tests.

`mp_colors` (what colour is the square) and `mp_counts` (how many squares), and the
mixture `mp_mixture` of both. Examples are a pure function of their index: 16x16
PNGs, one answer each, byte-level vocabulary (259 ids, fits the `tiny` model), no
sampling anywhere. So any process reading shard i of n sees exactly the examples
i, i + n, ... of the unsharded order, and a global batch assembled from n
processes holds the same examples as one process's batch.

`mp_strips` has images of three aspect ratios (1, 2 and 3 to 1), for MoME's Pix2Struct tower.

`mp_indexed` names its example's index in the question ("example 17"), so that the
elastic-restore test can tell which examples a host count saw, once each or not.
"""
import seqio
import tensorflow as tf

from omni_smola.data import register_vl_mixture, register_vl_task

SIZES = {"train": 64, "validation": 16}
COLORS = ("red", "green", "blue", "white")
PALETTE = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255))


def _colors(index):
  color = index % len(COLORS)
  image = tf.ones([16, 16, 3], tf.uint8) * tf.constant(PALETTE, tf.uint8)[color]
  return image, "what color is the square?", tf.gather(tf.constant(COLORS), color)


def _counts(index):
  count = index % 4 + 1
  columns = tf.range(16)[None, :, None]
  image = tf.where((columns // 4) < count, tf.constant(200, tf.uint8), tf.constant(0, tf.uint8))
  image = tf.broadcast_to(image, [16, 16, 3])
  return image, "how many squares?", tf.strings.as_string(count)


def _strips(index):
  """A 16-pixel-high strip 1, 2 or 3 times as wide: a Pix2Struct tower's own grids."""
  widths = index % 3 + 1
  image = tf.fill(tf.stack([16, 16 * widths, 3]), tf.constant(90, tf.uint8))
  return image, "how wide is the strip?", tf.strings.as_string(widths)


def _indexed(index):
  image = tf.zeros([16, 16, 3], tf.uint8)
  return image, tf.strings.join(["example ", tf.strings.as_string(index)]), tf.constant("x")


def _source(make):
  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed

    def example(index):
      image, question, answer = make(tf.cast(index, tf.int32))
      return {"image": tf.io.encode_png(image), "question": tf.convert_to_tensor(question),
              "answers": tf.reshape(answer, [1]),
              "image_id": tf.strings.as_string(index), "question_id": tf.constant("q")}

    return tf.data.Dataset.range(SIZES[split]).map(example)

  return seqio.FunctionDataSource(dataset_fn, splits=tuple(SIZES))


for _name, _make in (("mp_colors", _colors), ("mp_counts", _counts)):
  register_vl_task(_name, source=_source(_make), prompt="answer en {question}",
                   vocabulary=seqio.ByteVocabulary(), sample_target=False)
register_vl_mixture("mp_mixture", {"mp_colors": 1.0, "mp_counts": 1.0})
register_vl_task("mp_strips", source=_source(_strips), prompt="answer en {question}",
                 vocabulary=seqio.ByteVocabulary(), sample_target=False, shuffle_buffer_size=16)
# A small shuffle buffer keeps its pipelines quick; one epoch is still a permutation.
register_vl_task("mp_indexed", source=_source(_indexed), prompt="{question}",
                 vocabulary=seqio.ByteVocabulary(), sample_target=False,
                 shuffle_buffer_size=16)
