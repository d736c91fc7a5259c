"""Registering a vision-language task or mixture: one call each.

    register_vl_task("my_vqa", source=tfds_source("my_vqa:1.0.0"),
                     prompt="answer en {question}", metric_fns=[metrics.vqa_accuracy],
                     postprocess_fn=postprocessors.vqa_answer)

The task reads contract examples (see `preprocessors`), builds the PaLI prompt, draws one
training target from `answers`, tokenizes and appends EOS; the image stays encoded until the
feature converter (see images.py for why). Its examples carry `answers` so metrics score
against every reference. `VLTask.dataset_from_contract` runs the same steps on contract
examples held in memory (inference on a user's image and question). Registration replaces
a task or mixture of the same name, so re-importing (or reloading) a registration module
never raises.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Optional, Sequence, Union

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from omni_smola.data import images
from omni_smola.data import preprocessors
from omni_smola.data import prompts
from omni_smola.data import task_ids
from omni_smola.data import vocabularies

MetricFn = Callable[..., Mapping[str, float]]
CONTRACT_SPLIT = "contract"  # the split name of `VLTask.dataset_from_contract`'s source


def vl_output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """The output features of every VL task; see feature_converter.py for their shapes."""
  return {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
      "image": seqio.ContinuousFeature(dtype=tf.string, rank=1),
      "task_id": seqio.ContinuousFeature(dtype=tf.int32, rank=1),
      "example_id": seqio.ContinuousFeature(dtype=tf.string, rank=1),
  }


class _LoaderWithoutAutocache(seqio.utils.LazyTfdsLoader):
  """seqio's TFDS loader, reading with TFDS's automatic in-memory cache off."""

  @property
  def read_config(self) -> tfds.ReadConfig:
    # A copy: seqio sets fields on what this returns, and the base may return a global.
    return dataclasses.replace(super().read_config, try_autocache=False)


class VLTfdsSource(seqio.TfdsDataSource):
  """A TFDS source that never caches a split in memory of its own accord.

  TFDS caches small unshuffled splits (`ReadConfig.try_autocache`), which is what
  evaluation reads; it then takes `num_examples` of them. See `VLTask` for why caching
  encoded images buys nothing and why a partly read cache warns.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._tfds_dataset.__class__ = _LoaderWithoutAutocache  # the loader seqio just built


def tfds_source(tfds_name: str, splits: Optional[Union[Sequence[str], Mapping[str, str]]] = None,
                tfds_data_dir: Optional[str] = None) -> VLTfdsSource:
  """A read-only TFDS source whose images stay encoded (the task decodes them).

  Read-only: a dataset that is not prepared fails with TFDS's own error instead of trying
  to download (real datasets are built from manual downloads; see tasks/builders).
  """
  return VLTfdsSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=splits,
                      decoders={"image": tfds.decode.SkipDecoding()}, read_only=True)


class VLTask(seqio.Task):
  """A seqio.Task that knows its prompt and can be fed contract examples directly.

  seqio caches any split under 10,000 examples in memory (`try_in_mem_cache`). For VL
  tasks that holds up to 10,000 encoded images per task and host, and buys little: reading
  TFDS records is cheap next to decoding the images, which happens after the cache anyway.
  Evaluation reads `num_examples` of such a cache and drops the rest, so tf.data discards
  the partial cache (and warns, once per task and evaluation); training stopped mid-epoch
  does the same. So this task never caches of its own accord.

  `dataset_from_contract` is how inference asks the task about a user's image: the same
  preprocessors training runs, minus the ones that map the source onto the contract.
  """

  def __init__(self, *args, prompt: Optional[prompts.Prompt] = None,
               num_source_preprocessors: int = 0, **kwargs):
    super().__init__(*args, **kwargs)
    self.prompt = prompt
    self.num_source_preprocessors = num_source_preprocessors

  def get_dataset(self, *args, try_in_mem_cache: bool = False, **kwargs) -> tf.data.Dataset:
    del try_in_mem_cache  # seqio's mixtures pass True; see the class docstring
    return super().get_dataset(*args, try_in_mem_cache=False, **kwargs)

  def asks_question(self) -> bool:
    """Whether the prompt (in the gin-chosen style) has a `{question}` to fill in."""
    return self.prompt is not None and (
        prompts.QUESTION_PLACEHOLDER in prompts.prompt_text(self.prompt))

  def dataset_from_contract(self, examples: tf.data.Dataset,
                            sequence_length: Mapping[str, int],
                            seed: int = 0) -> tf.data.Dataset:
    """This task's examples for `examples` (contract examples) instead of its source's.

    seqio's own `get_dataset` runs, unshuffled, over a source that yields `examples`, with
    the task's preprocessors after its `source_preprocessors` (those map the source's
    features onto the contract, which `examples` already follow). So the prompt, its
    tokens, EOS and trimming are the ones training sees. `seed` is seqio's (it draws the
    training target among `answers`; the prompt does not depend on it).
    """
    task = seqio.Task(self.name, source=contract_source(examples),
                      output_features=self.output_features,
                      preprocessors=self.preprocessors[self.num_source_preprocessors:],
                      shuffle_buffer_size=None)
    return task.get_dataset(sequence_length, split=CONTRACT_SPLIT, shuffle=False, seed=seed)


def contract_source(examples: tf.data.Dataset) -> seqio.FunctionDataSource:
  """A source whose one split, CONTRACT_SPLIT, yields `examples` (contract examples)."""
  return seqio.FunctionDataSource(lambda split, shuffle_files, seed=None: examples,
                                  splits=[CONTRACT_SPLIT])


def _resolve_vocabulary(vocabulary: Union[str, seqio.Vocabulary]) -> seqio.Vocabulary:
  if isinstance(vocabulary, str):
    return vocabularies.get_vocabulary(vocabulary)
  return vocabulary


def build_vl_task(
    name: str,
    *,
    source: seqio.DataSource,
    prompt: prompts.Prompt,
    metric_fns: Sequence[MetricFn] = (),
    postprocess_fn: Optional[Callable] = None,
    vocabulary: Union[str, seqio.Vocabulary] = "default",
    sample_target: bool = True,
    on_corrupt_image: str = images.ON_CORRUPT_RAISE,
    source_preprocessors: Sequence[Callable] = (),
    shuffle_buffer_size: Optional[int] = seqio.dataset_providers.SHUFFLE_BUFFER_SIZE,
) -> VLTask:
  """A captioning/VQA task, not registered (`register_vl_task` registers one).

  Args:
    name: the task's name; also determines its `task_id`.
    source: a seqio.DataSource of contract examples with encoded images (`tfds_source`).
    prompt: `CAPTION_PROMPT` / `VQA_PROMPT` (a `StyledPrompt`: the text follows
      `omni_smola.data.prompt_style`) or a string such as "answer en {question}";
      `{question}` is filled in.
    metric_fns: seqio metric fns `fn(targets, predictions)`; targets are what
      `postprocess_fn` returns for targets (every reference, for our postprocessors).
    postprocess_fn: seqio postprocess fn (omni_smola.evaluation.postprocessors).
    vocabulary: a seqio.Vocabulary or a name for `get_vocabulary` ("default" is the
      gin-configured SentencePiece model, "mini" the shipped mini one).
    sample_target: draw the training target among `answers` (else take the first one).
    on_corrupt_image: "raise": the feature converter raises CorruptImageError naming the
      example; "skip": the task drops (logs and counts) such examples, at the cost of
      decoding every image once more. gin's `omni_smola.data.on_corrupt_image.by_task`
      overrides it per task name.
    source_preprocessors: run first, to map a source's own features onto the contract.
    shuffle_buffer_size: seqio's shuffle buffer for this task.
  """
  if on_corrupt_image not in (images.ON_CORRUPT_RAISE, images.ON_CORRUPT_SKIP):
    raise ValueError(f"on_corrupt_image must be 'raise' or 'skip', got {on_corrupt_image!r}")
  if isinstance(prompt, str):
    prompts.split_prompt(prompt)  # fail at registration, not at the first dataset
  identifier = task_ids.claim_task_id(name)
  task_preprocessors = list(source_preprocessors) + [
      functools.partial(preprocessors.format_vl_example, prompt=prompt, task_id=identifier,
                        sample_target=sample_target),
  ]
  task_preprocessors.append(functools.partial(  # gin may override the policy per task
      images.apply_corrupt_image_policy, task_name=name, registered=on_corrupt_image))
  task_preprocessors += [preprocessors.tokenize_text, seqio.preprocessors.append_eos_after_trim]
  return VLTask(
      name,
      source=source,
      preprocessors=task_preprocessors,
      output_features=vl_output_features(_resolve_vocabulary(vocabulary)),
      postprocess_fn=postprocess_fn,
      metric_fns=list(metric_fns),
      shuffle_buffer_size=shuffle_buffer_size,
      prompt=prompt,
      num_source_preprocessors=len(source_preprocessors),
  )


def register_vl_task(name: str, **kwargs) -> VLTask:
  """Registers (or replaces) a captioning/VQA task and returns it; see `build_vl_task`."""
  task = build_vl_task(name, **kwargs)
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add_provider(name, task)
  return task


def register_vl_mixture(name: str, tasks_and_rates: Union[Mapping[str, float],
                                                          Sequence[tuple[str, float]]],
                        ) -> seqio.Mixture:
  """Registers (or replaces) a mixture of registered tasks with sampling rates."""
  if isinstance(tasks_and_rates, Mapping):
    tasks_and_rates = list(tasks_and_rates.items())
  tasks_and_rates = [(task, float(rate)) for task, rate in tasks_and_rates if rate > 0]
  if not tasks_and_rates:
    raise ValueError(f"Mixture {name!r} has no task with a positive rate.")
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, tasks_and_rates)
