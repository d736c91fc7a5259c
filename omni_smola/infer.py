r"""Asks a task's prompt about image files: `python -m omni_smola.infer --task=T --image=F`.

    python -m omni_smola.infer \
      --gin_file=experiments/mini_infer.gin \
      --gin.CHECKPOINT_PATH=runs/demo/omni_smola \
      --task=mini_shapes_color_qa --question='what colour is the circle?' \
      --image=photo.png --image=chart.png

Prints one `path<TAB>text` line per image. `--decoding=beam` (with --beam_size) or
greedy; INFER_OUTPUT_DIR also receives predictions.jsonl.

The example is built the way training builds it, not re-implemented here: each image file's
bytes and the question become a contract example (what a task's source yields), the
registered task's own preprocessors turn it into a prompt and tokens (in the gin-chosen
prompt style, with the task's vocabulary), and the trainer's feature converter decodes and
resizes the image (`infer_features`). `--task` (or the INFER_TASK macro) names the task;
a VQA task needs `--question`, a captioning task refuses one. `--prompt=TEXT` instead asks
an ad-hoc prompt (`{question}` in it is filled in with --question) through the same steps,
with the VOCABULARY macro's vocabulary; it cannot be combined with a task.

Several tasks in one batch: `--task` and `--question` once per `--image`, in order (`''` as
the question of an image whose task asks none). With runs/serve_specialists.gin (SPECIALISTS
instead of CHECKPOINT_PATH) each image is answered by its own task's specialist.
"""

import sys

if __name__ == "__main__":
  from omni_smola import console  # pylint: disable=g-import-not-at-top
  console.hold_native_stderr()  # before TensorFlow loads and prints its start-up lines
  # Run as `python -m omni_smola.infer`: gin files `import omni_smola.infer`, which must be
  # this module (not a second copy defining its flags and configurables again).
  sys.modules.setdefault("omni_smola.infer", sys.modules[__name__])

import difflib
import json
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from absl import flags
import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from omni_smola import launching
from omni_smola import param_layout
from omni_smola.checkpoints import specialist_bank
from omni_smola.models.pix2struct_patches import PATCH_FEATURES, Pix2StructPatching
from omni_smola.data import (PaliFeatureConverter, VLTask, build_vl_task, contract_source,
                             task_id)
from omni_smola.training import checkpointing, data_iterator, partitioned_step, trainer

flags.DEFINE_multi_string("image", [], "Image files to describe or ask about.")
flags.DEFINE_multi_string("task", None, "The registered task whose prompt to ask (overrides "
                          "INFER_TASK), e.g. mini_shapes_caption; once for every --image, "
                          "or once per --image (in order) for a batch of several tasks.")
flags.DEFINE_multi_string("question", None, "The question, for a VQA task (or a --prompt "
                          "with {question}); once, or once per --image ('' for one whose "
                          "task asks none).")
flags.DEFINE_string("prompt", None, "An ad-hoc prompt instead of a task's, e.g. "
                    "'answer en what is this?'.")
flags.DEFINE_enum("decoding", None, ["greedy", "beam"], "Overrides infer.decoding.")
flags.DEFINE_integer("beam_size", None, "Overrides infer.beam_size.")
FLAGS = flags.FLAGS

AD_HOC_TASK = "infer_prompt"  # the name (and task_id) of a --prompt's task


def _registered_task(name: str) -> VLTask:
  if name in seqio.TaskRegistry.names():
    task = seqio.TaskRegistry.get(name)
    if not isinstance(task, VLTask):
      raise launching.FlagError(f"--task={name!r} is not a vision-language task (one "
                                "registered with register_vl_task)")
    return task
  if name in seqio.MixtureRegistry.names():
    tasks = sorted(t.name for t in seqio.get_mixture_or_task(name).tasks)
    raise launching.FlagError(f"--task={name!r} is a mixture; name one of its tasks: "
                              f"{', '.join(tasks)}")
  close = difflib.get_close_matches(name, sorted(seqio.TaskRegistry.names()), n=3)
  raise launching.FlagError(
      f"--task={name!r}: no task is registered under that name (--task or INFER_TASK; "
      "tasks come from MIXTURE_OR_TASK_MODULE)" +
      (f"; did you mean {' or '.join(close)}?" if close else ""))


def resolve_task(task: Optional[str], prompt: Optional[str], question: Optional[str],
                 vocabulary: str = "default") -> VLTask:
  """The task whose preprocessors build the examples; errors name the flags at fault.

  Args:
    task: a registered VL task (--task / INFER_TASK), or None with `prompt`.
    prompt: an ad-hoc prompt (--prompt), or None with `task`.
    question: --question: required by a task whose prompt has `{question}`, refused by
      one without (a question a captioning prompt drops would be silently ignored).
    vocabulary: the ad-hoc prompt's vocabulary (a task brings its own).
  """
  if task and prompt is not None:
    raise launching.FlagError(
        f"--prompt={prompt!r} and task {task!r} (--task or INFER_TASK) are both given: the "
        "task brings its own prompt; pass one of them")
  if task:
    resolved, named = _registered_task(task), f"--task={task!r}"
  elif prompt is not None:
    try:
      # Its source is never read: `infer_features` hands it the examples.
      resolved = build_vl_task(AD_HOC_TASK, source=contract_source(tf.data.Dataset.range(0)),
                               prompt=prompt, vocabulary=vocabulary)
    except ValueError as e:
      raise launching.FlagError(f"--prompt={prompt!r}: {e}") from None
    named = f"--prompt={prompt!r}"
  else:
    raise launching.FlagError("no task given: pass --task=NAME (a registered task, e.g. "
                              "mini_shapes_caption; or set INFER_TASK) or --prompt=TEXT")
  asked = bool(question and question.strip())
  if resolved.asks_question() and not asked:
    raise launching.FlagError(f"{named} asks a question: pass --question=TEXT")
  if asked and not resolved.asks_question():
    raise launching.FlagError(f"{named} asks no question (its prompt has no {{question}}): "
                              f"drop --question={question!r} or name a VQA task")
  return resolved


def contract_examples(images: Sequence[str], question: str = "") -> tf.data.Dataset:
  """One contract example per image file, as a task's source would yield it (no answer)."""
  for path in images:
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"image file does not exist: {path}")
  encoded = [tf.io.gfile.GFile(path, "rb").read() for path in images]
  count = len(images)
  return tf.data.Dataset.from_tensor_slices({
      # object arrays: numpy's bytes dtype would drop an image's trailing NUL bytes
      "image": np.array(encoded, dtype=object),
      "image_id": np.array(list(images), dtype=object),
      "question_id": np.array([str(i) for i in range(count)], dtype=object),
      "question": np.array([question] * count, dtype=object),
      "answers": np.array([[""]] * count, dtype=object),
      "answer_type": np.array([""] * count, dtype=object),
  })


def _unreadable_image(message: str) -> str:
  """The file and reason of the converter's CorruptImageError, without its dataset advice;
  or the Pix2Struct cut's refusal of an image too elongated, as plain text."""
  if "Pix2Struct patches" in message:  # data.pix2struct_inputs: too elongated for the tower
    parts = message.split("Summarized data:")[-1].strip().splitlines()
    return "--image: " + " ".join(re.sub(r"""^b(['"])(.*)\1$""", r"\2", p.strip())
                                  for p in parts if p.strip())
  found = re.search(r"image_id=(.*?), question_id=.*?cannot be decoded: (.*?)\.? Fix or",
                    message, re.S)
  if not found:
    return f"--image: cannot decode an image: {message.strip().splitlines()[0]}"
  return f"--image={found.group(1)}: cannot be decoded: {found.group(2)}"


def infer_features(task: VLTask, images: Sequence[str], question: str,
                   lengths: Dict[str, int], image_size: int,
                   pix2struct_patching: Optional[Pix2StructPatching] = None,
                   ) -> Tuple[Dict[str, np.ndarray], List[str]]:
  """({image, encoder_input_tokens[, Pix2Struct patches]} stacked over `images`, each
  prompt's text).

  The features the trainer's pipeline makes of these images and this question through
  `task`: its preprocessors (`VLTask.dataset_from_contract`), then `PaliFeatureConverter`
  at the model's image size (and Pix2Struct cut).
  """
  examples = task.dataset_from_contract(contract_examples(images, question or ""), lengths)
  converter = PaliFeatureConverter(image_size=image_size, pix2struct_patching=pix2struct_patching)
  converted = converter(examples, lengths)
  try:
    seen = list(examples.as_numpy_iterator())
    features = list(converted.as_numpy_iterator())
  except tf.errors.OpError as e:  # an image the converter cannot decode
    raise launching.FlagError(_unreadable_image(e.message)) from None
  kept = [row["image_id"].decode() for row in seen]
  if kept != list(images):  # a task registered with on_corrupt_image='skip' drops them
    dropped = [path for path in images if path not in kept]
    raise launching.FlagError(f"--image: task {task.name!r} cannot decode {dropped}")
  keys = ("image", "encoder_input_tokens") + (PATCH_FEATURES if pix2struct_patching else ())
  stacked = {key: np.stack([row[key] for row in features]) for key in keys}
  return stacked, [row["inputs_pretokenized"].decode() for row in seen]


@gin.configurable(module="omni_smola.infer")
def infer(*, model, checkpoint_path: str, images: Sequence[str],
          task: Union[str, Sequence[str], None] = None,
          question: Union[str, Sequence[str], None] = None, prompt: Optional[str] = None,
          vocabulary: str = "default", input_length: int = 32, max_decode_length: int = 32,
          decoding: str = "greedy", beam_size: int = 4, output_dir: Optional[str] = None,
          module: Union[str, Sequence[str], None] = None,
          partitioner: Optional[partitioned_step.Partitioner] = None,
          specialists: Optional[Mapping[str, str]] = None) -> List[str]:
  """The decoded text for each image, asked its task's prompt (or an ad-hoc one).

  Images of several tasks share one batch: each is built by its own task's preprocessors
  and carries its task's id, so a `task_lora` bank answers each with its own specialist.

  Args:
    model: the `PaliModel` the checkpoint was trained as.
    checkpoint_path: CHECKPOINT_PATH: a MODEL_DIR, checkpoints/ dir or step dir.
    images: image files (any format the feature converter decodes).
    task: INFER_TASK (or --task): a registered VL task, e.g. 'mini_shapes_color_qa'; or
      one per image.
    question: the question, for a task (or prompt) with `{question}`; or one per image
      ('' for an image whose task asks none).
    prompt: an ad-hoc prompt instead of a task, e.g. 'answer en what is this?'.
    vocabulary: VOCABULARY: the ad-hoc prompt's vocabulary (`get_vocabulary` name).
    input_length, max_decode_length: prompt and output token budgets.
    decoding: 'greedy' or 'beam' (`beam_size` beams).
    output_dir: INFER_OUTPUT_DIR; when set, predictions.jsonl is written there.
    module: MIXTURE_OR_TASK_MODULE, imported to register the tasks.
    specialists: SPECIALISTS, {task: specialist checkpoint}, instead of
      `checkpoint_path`: the model's `task_lora` bank answers with the task's own
      specialist (runs/serve_specialists.gin); the task must be one of them.
  """
  if not images:
    raise launching.FlagError("no image given: pass --image=PATH (repeatable)")
  if decoding not in ("greedy", "beam"):
    raise ValueError(f"decoding={decoding!r} is not 'greedy' or 'beam'")
  data_iterator.import_task_modules(module)
  tasks = _per_image("task", task, len(images))
  questions = _per_image("question", question, len(images))
  for name in dict.fromkeys(tasks) if specialists else ():
    _check_bank_task(name, checkpoint_path, specialists)
  size = trainer.image_size_of(model)
  features, prompts, tasks_of = batch_features(
      images, tasks, questions, {"inputs": input_length, "targets": max_decode_length}, size,
      prompt=prompt, vocabulary=vocabulary,
      pix2struct_patching=model.config.pix2struct_patching)
  path = (f"SPECIALISTS = {dict(specialists)}" if specialists
          else checkpointing.resolve_checkpoint(checkpoint_path))
  partitioner = partitioner if partitioner is not None else partitioned_step.Partitioner()
  rows = -(-len(images) // partitioner.data_parallel_size) * partitioner.data_parallel_size
  pad = rows - len(images)
  batch = {key: np.concatenate([value, np.repeat(value[-1:], pad, 0)])
           for key, value in features.items()}
  batch["decoder_input_tokens"] = np.zeros((rows, max_decode_length), np.int32)
  shapes = {"encoder_input_tokens": (1, input_length),
            "decoder_input_tokens": (1, max_decode_length)}
  if model.config.vision is not None:
    shapes["image"] = (1, size, size, 3)
  abstract = partitioned_step.abstract_variables(model, shapes)
  params_sharding = partitioner.variables_sharding(abstract)["params"]
  target = partitioned_step.with_sharding(param_layout.unbox(abstract["params"]),
                                         params_sharding)
  params = (specialist_bank.load_bank(specialists, target, model.adapters) if specialists
            else checkpointing.restore_params(path, target, require_adapters=True))
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
  texts = [owner.output_features["targets"].vocabulary.decode([int(t) for t in row if t != 0])
           for owner, row in zip(tasks_of, decoded[:len(images)])]
  if output_dir and jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "predictions.jsonl"), "w") as f:
      for image, text, asked, name, asking in zip(images, texts, prompts, tasks, questions):
        f.write(json.dumps({"image": image, "task": name or None, "question": asking,
                            "prompt": asked, "prediction": text, "checkpoint": path,
                            "decoding": decoding}) + "\n")
  return texts


def batch_features(images: Sequence[str], tasks: Sequence[Optional[str]],
                   questions: Sequence[Optional[str]], lengths: Dict[str, int],
                   image_size: int, *, prompt: Optional[str] = None,
                   vocabulary: str = "default",
                   pix2struct_patching: Optional[Pix2StructPatching] = None,
                   ) -> Tuple[Dict[str, np.ndarray], List[str], List[VLTask]]:
  """(features with `task_id`, prompts, tasks) of `images`, image i asked `tasks[i]`.

  Images asked the same task and question go through that task together
  (`resolve_task`, `infer_features`); the rows are put back in the images' order, each
  with its task's id, so one batch holds several tasks.
  """
  groups = {}  # (task, question) -> the indices of its images, in order
  for index, key in enumerate(zip(tasks, questions)):
    groups.setdefault(key, []).append(index)
  resolved = {key: resolve_task(key[0], prompt, key[1], vocabulary) for key in groups}
  rows, prompts, owners = [None] * len(images), [None] * len(images), [None] * len(images)
  for key, indices in groups.items():
    features, asked = infer_features(resolved[key], [images[i] for i in indices], key[1] or "",
                                     lengths, image_size, pix2struct_patching)
    for row, index in enumerate(indices):
      rows[index] = {name: value[row] for name, value in features.items()}
      prompts[index], owners[index] = asked[row], resolved[key]
  stacked = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
  stacked["task_id"] = np.array([task_id(owner.name) for owner in owners], np.int32)
  return stacked, prompts, owners


def _per_image(flag: str, values: Union[str, Sequence[str], None], count: int) -> list:
  """`values` for each of `count` images: one value is every image's."""
  if values is None or isinstance(values, str):
    return [values] * count
  values = list(values) or [None]
  if len(values) == 1:
    return values * count
  if len(values) != count:
    raise launching.FlagError(
        f"--{flag} is given {len(values)} times for {count} --image files: give it once "
        "(for every image) or once per image, in the same order")
  return values


def _check_bank_task(task: Optional[str], checkpoint_path: Optional[str],
                     specialists: Mapping[str, str]) -> None:
  """A bank answers a task it has a specialist for, and takes nothing from CHECKPOINT_PATH."""
  if checkpoint_path:
    raise launching.FlagError(
        f"CHECKPOINT_PATH={checkpoint_path!r} and SPECIALISTS are both set: a bank takes its "
        "generalist from the specialists' checkpoints; set CHECKPOINT_PATH = None")
  if task not in specialists:  # the generalist alone would answer, silently
    raise launching.FlagError(
        f"{'--task=' + repr(task) if task else '--prompt'} has no specialist in SPECIALISTS "
        f"(tasks: {', '.join(sorted(specialists))})")


def main(argv):
  def run():
    overrides = {}
    if FLAGS.decoding:
      overrides["decoding"] = FLAGS.decoding
    if FLAGS.beam_size:
      overrides["beam_size"] = FLAGS.beam_size
    if FLAGS.task is not None:
      overrides["task"] = FLAGS.task
    return infer(images=FLAGS.image, prompt=FLAGS.prompt, question=FLAGS.question,
                 **overrides)

  texts = launching.run_configured(argv, "infer", "INFER_OUTPUT_DIR", run)
  if jax.process_index() == 0:
    for image, text in zip(FLAGS.image, texts):
      print(f"{image}\t{text}", flush=True)


def console_entry_point():
  launching.run(main)


if __name__ == "__main__":
  console_entry_point()
