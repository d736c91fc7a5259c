r"""Decodes a prompt about image files: `python -m omni_smola.infer --image=... --prompt=...`.

    python -m omni_smola.infer \
      --gin_file=experiments/mini_infer.gin \
      --gin.CHECKPOINT_PATH=runs/demo/omni_smola \
      --image=photo.png --image=chart.png --prompt='answer en what colour is the circle?'

Prints one `path<TAB>text` line per image. `--decoding=beam` (with --beam_size) or
greedy; INFER_OUTPUT_DIR also receives predictions.jsonl. The prompt is tokenized
with the gin-chosen vocabulary (`VOCABULARY`, the one the model was trained with)
and EOS-terminated, as the training tasks do.
"""

import sys

if __name__ == "__main__":
  from omni_smola import console  # pylint: disable=g-import-not-at-top
  console.hold_native_stderr()  # before TensorFlow loads and prints its start-up lines
  # Run as `python -m omni_smola.infer`: gin files `import omni_smola.infer`, which must be
  # this module (not a second copy defining its flags and configurables again).
  sys.modules.setdefault("omni_smola.infer", sys.modules[__name__])

import json
import os
from typing import List, Optional, Sequence

from absl import flags
import gin
import jax
import numpy as np
import tensorflow as tf

from omni_smola import launching
from omni_smola.data import get_vocabulary, resize_and_normalize
from omni_smola.training import checkpointing, partitioned_step, trainer

flags.DEFINE_multi_string("image", [], "Image files to describe or ask about.")
flags.DEFINE_string("prompt", "caption en", "The prompt, e.g. 'answer en what is this?'.")
flags.DEFINE_enum("decoding", None, ["greedy", "beam"], "Overrides infer.decoding.")
flags.DEFINE_integer("beam_size", None, "Overrides infer.beam_size.")
FLAGS = flags.FLAGS


def load_image(path: str, image_size: int) -> np.ndarray:
  """An image file -> float32 [H, W, 3] in [-1, 1], as the feature converter makes it."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"image file does not exist: {path}")
  data = tf.io.read_file(path)
  try:
    image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
  except tf.errors.InvalidArgumentError as e:
    raise ValueError(f"cannot decode image {path}: {e.message}") from None
  return resize_and_normalize(image, (image_size, image_size)).numpy()


def encode_prompt(vocabulary, prompt: str, length: int) -> np.ndarray:
  ids = list(vocabulary.encode(prompt))[:length - 1] + [vocabulary.eos_id]
  return np.asarray(ids + [0] * (length - len(ids)), np.int32)


@gin.configurable(module="omni_smola.infer")
def infer(*, model, checkpoint_path: str, images: Sequence[str], prompt: str,
          vocabulary: str = "default", input_length: int = 32, max_decode_length: int = 32,
          decoding: str = "greedy", beam_size: int = 4, output_dir: Optional[str] = None,
          partitioner: Optional[partitioned_step.Partitioner] = None) -> List[str]:
  """The decoded text for each image, given one prompt.

  Args:
    model: the `PaliModel` the checkpoint was trained as.
    checkpoint_path: CHECKPOINT_PATH: a MODEL_DIR, checkpoints/ dir or step dir.
    images: image files (any format TensorFlow decodes).
    prompt: e.g. 'caption en' or 'answer en what colour is the square?'.
    vocabulary: the name `omni_smola.data.get_vocabulary` takes ('mini', a path...).
    input_length, max_decode_length: prompt and output token budgets.
    decoding: 'greedy' or 'beam' (`beam_size` beams).
    output_dir: INFER_OUTPUT_DIR; when set, predictions.jsonl is written there.
  """
  if not images:
    raise ValueError("no image given: pass --image=PATH (repeatable)")
  if decoding not in ("greedy", "beam"):
    raise ValueError(f"decoding={decoding!r} is not 'greedy' or 'beam'")
  path = checkpointing.resolve_checkpoint(checkpoint_path)
  vocab = get_vocabulary(vocabulary)
  size = trainer.image_size_of(model)
  pixels = np.stack([load_image(p, size) for p in images])
  partitioner = partitioner if partitioner is not None else partitioned_step.Partitioner()
  rows = -(-len(images) // partitioner.data_parallel_size) * partitioner.data_parallel_size
  pad = rows - len(images)
  tokens = np.stack([encode_prompt(vocab, prompt, input_length)] * len(images))
  batch = {
      "image": np.concatenate([pixels, np.repeat(pixels[-1:], pad, 0)]),
      "encoder_input_tokens": np.concatenate([tokens, np.repeat(tokens[-1:], pad, 0)]),
      "decoder_input_tokens": np.zeros((rows, max_decode_length), np.int32),
  }
  shapes = {"encoder_input_tokens": (1, input_length),
            "decoder_input_tokens": (1, max_decode_length)}
  if model.config.vision is not None:
    shapes["image"] = (1, size, size, 3)
  abstract = partitioned_step.abstract_variables(model, shapes)
  params_sharding = partitioner.variables_sharding(abstract)["params"]
  params = checkpointing.restore_params(path, partitioned_step.with_sharding(
      trainer.box_values(abstract["params"]), params_sharding), require_adapters=True)
  decoder_params = {"decoding": decoding, "max_decode_length": max_decode_length}
  num_decodes = beam_size if decoding == "beam" else 1

  def predict(params, batch):
    return model.predict_batch_with_aux(params, batch, decoder_params=decoder_params,
                                        num_decodes=num_decodes)[0]

  per_host = rows // jax.process_count()
  local = {k: v[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]
           for k, v in batch.items()}
  run = partitioned_step.jit_params_fn(partitioner, predict, params_sharding,
                                       partitioner.batch_sharding(local))
  decoded = np.asarray(run(params, partitioner.global_batch(local, rows)).addressable_data(0))
  texts = [vocab.decode([int(t) for t in row if t != 0]) for row in decoded[:len(images)]]
  if output_dir and jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "predictions.jsonl"), "w") as f:
      for image, text in zip(images, texts):
        f.write(json.dumps({"image": image, "prompt": prompt, "prediction": text,
                            "checkpoint": path, "decoding": decoding}) + "\n")
  return texts


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  launching.initialize_from_flags()

  def run():
    launching.parse_gin_from_flags()
    launching.start_log_file(launching.macro_value("INFER_OUTPUT_DIR"), "infer")
    overrides = {}
    if FLAGS.decoding:
      overrides["decoding"] = FLAGS.decoding
    if FLAGS.beam_size:
      overrides["beam_size"] = FLAGS.beam_size
    return infer(images=FLAGS.image, prompt=FLAGS.prompt, **overrides)

  texts = launching.exit_on_user_error(run)
  if jax.process_index() == 0:
    for image, text in zip(FLAGS.image, texts):
      print(f"{image}\t{text}", flush=True)


def console_entry_point():
  launching.run(main)


if __name__ == "__main__":
  console_entry_point()
