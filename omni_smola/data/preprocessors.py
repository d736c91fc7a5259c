"""seqio preprocessors that turn contract examples into PaLI-style text+image examples.

The contract every VL source follows (TFDS builders in tasks/builders, the mini mixture):
  image        encoded image bytes (read with tfds.decode.SkipDecoding())
  image_id     str
  question_id  str
  question     str, empty for captioning
  answers      [n] str: VQA's annotator answers, the reference captions, the gold answers
  answer_type  str, may be empty
"""
from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

from omni_smola.data import images
from omni_smola.data import prompts


def format_prompt(question: tf.Tensor, prompt: prompts.Prompt) -> tf.Tensor:
  """`prompt` (in the gin-chosen style) with `{question}` replaced by the question."""
  text = prompts.prompt_text(prompt)
  prefix, suffix = prompts.split_prompt(text)
  if prompts.QUESTION_PLACEHOLDER not in text:
    return tf.constant(text)
  return tf.strings.join([prefix, tf.strings.strip(question), suffix])


@seqio.map_over_dataset(num_seeds=1)
def _format_with_sampled_target(example: Mapping[str, tf.Tensor], seed, *,
                                prompt: prompts.Prompt,
                                task_id: int, sample_target: bool):
  answers = tf.reshape(example["answers"], [-1])
  num_answers = tf.size(answers)
  if sample_target:
    # Stateless, so the choice is a function of seqio's seed and the example's position.
    index = tf.random.stateless_uniform([], seed, 0, tf.maximum(num_answers, 1), tf.int32)
  else:
    index = tf.constant(0)
  target = tf.cond(num_answers > 0, lambda: answers[tf.minimum(index, num_answers - 1)],
                   lambda: tf.constant(""))
  question = example.get("question", tf.constant(""))
  formatted = {
      "inputs": format_prompt(question, prompt),
      "targets": tf.strings.strip(target),
      "answers": answers,
      "question": question,
  }
  for key in ("image_id", "question_id", "answer_type"):
    formatted[key] = example.get(key, tf.constant(""))
  # Rank 1, not scalars: seqio's Evaluator measures every output feature along axis 0.
  formatted["image"] = tf.reshape(example["image"], [1])
  formatted["task_id"] = tf.constant([task_id], tf.int32)
  formatted["example_id"] = tf.reshape(
      images.example_description(formatted["image_id"], formatted["question_id"]), [1])
  return formatted


def format_vl_example(dataset: tf.data.Dataset, *, prompt: prompts.Prompt, task_id: int,
                      sample_target: bool = True) -> tf.data.Dataset:
  """Contract example -> {inputs, targets (strings), image, task_id, example_id, answers...}.

  Args:
    dataset: contract examples, `image` still encoded.
    prompt: a `prompts.StyledPrompt` (the text read from gin now) or a string such as
      "answer en {question}".
    task_id: the task's stable id (`omni_smola.data.task_id(name)`).
    sample_target: if True, `targets` is one of `answers` drawn with seqio's seed (so the
      choice is reproducible under a fixed seed and varies across epochs otherwise);
      if False, the first answer. Metrics always see every answer (`answers`).
  """
  image_spec = dataset.element_spec.get("image")
  if image_spec is None or image_spec.dtype != tf.string or image_spec.shape.rank != 0:
    raise ValueError(f"`image` must be the encoded image (a tf.string scalar), got "
                     f"{image_spec}; read TFDS images with "
                     "decoders={'image': tfds.decode.SkipDecoding()} (see tfds_source).")
  return _format_with_sampled_target(dataset, prompt=prompt, task_id=task_id,
                                     sample_target=sample_target)


def tokenize_text(dataset: tf.data.Dataset,
                  output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """seqio's tokenize, restricted to string features (no `image_pretokenized` copies)."""
  text_features = {k: f for k, f in output_features.items()
                   if isinstance(dataset.element_spec.get(k), tf.TensorSpec)
                   and dataset.element_spec[k].dtype == tf.string
                   and not isinstance(f, seqio.ContinuousFeature)}
  return seqio.preprocessors.tokenize(dataset, text_features, copy_pretokenized=True)
