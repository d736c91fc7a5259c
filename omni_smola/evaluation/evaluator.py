"""seqio.Evaluator glue: predict and score functions over a sharded model, and outputs.

`ModelEvaluator` evaluates a task or mixture with each task's own metric_fns and
postprocessor (seqio decides which tasks and how). It writes, under its output
directory:

    metrics.json                         {step: {task: {metric: value}}}, all steps so far
    predictions/<task>-<step>.jsonl      one line per example: prompt, prediction,
                                         references, raw decoded output, ids

and, given a clu writer, one TensorBoard scalar per `task/metric`. Only the first
process writes. A task whose metrics raise is logged with its name and left out of
that step's results (`ModelEvaluator.last_failures` says why); the other tasks are
recorded as usual. Every process runs every batch (each contributes its rows of the
global batch), so predictions come back whole on every host.

With `mix_tasks` (the default) the tasks' examples share batches (`task_mixing.py`):
only the evaluation's last batch is padded, not every task's, and each row is still
the model's output for that example alone; `ModelEvaluator.mix_tasks = False` feeds each
task as its own batches.
"""
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from absl import logging
import gin
import jax
import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from omni_smola import console
from omni_smola.data import PaliFeatureConverter
from omni_smola.evaluation import tables, task_mixing
from omni_smola.training import partitioned_step, program_cache

METRICS_FILE = "metrics.json"
PREDICTIONS_SUBDIR = "predictions"
_EXAMPLE_FIELDS = ("inputs_pretokenized", "image_id", "question_id", "question")


def _text(value) -> Any:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  if isinstance(value, np.ndarray):
    return _text(value.item()) if value.ndim == 0 else [_text(v) for v in value.tolist()]
  if isinstance(value, (list, tuple)):
    return [_text(v) for v in value]
  if isinstance(value, dict):
    return {k: _text(v) for k, v in value.items()}
  if isinstance(value, np.generic):
    return value.item()
  return value


def write_json_atomically(path: str, content: Any) -> None:
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    json.dump(content, f, indent=1, sort_keys=True)
  tf.io.gfile.rename(tmp, path, overwrite=True)


class PredictionsJsonlLogger(seqio.Logger):
  """A seqio logger writing one JSON line per evaluated example (no image arrays)."""

  def __call__(self, task_name: str, step: Optional[int], metrics, dataset, inferences,
               targets) -> None:
    if jax.process_index() != 0 or not inferences or dataset is None:
      return
    directory = os.path.join(self.output_dir, PREDICTIONS_SUBDIR)
    tf.io.gfile.makedirs(directory)
    path = os.path.join(directory, f"{task_name}-{-1 if step is None else step:06d}.jsonl")
    fields = [k for k in ("prediction", "output", "score") if k in inferences]
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
      for index, example in enumerate(tfds.as_numpy(dataset)):
        line = {"index": index, "task": task_name}
        for key in _EXAMPLE_FIELDS:
          if key in example:
            line["inputs" if key == "inputs_pretokenized" else key] = _text(example[key])
        if targets is not None and index < len(targets):
          line["target"] = _text(targets[index])
        for key in fields:
          if index < len(inferences[key]):
            line[key] = _text(inferences[key][index])
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
    logging.info("Wrote %s", path, extra=console.FILE_ONLY)


def scalar_metrics(task_metrics: Mapping[str, Any]) -> Dict[str, float]:
  """The numeric metrics of one task (seqio Scalars unwrapped, nested dicts flattened)."""
  flat = {}
  for name, value in task_metrics.items():
    value = getattr(value, "value", value)
    if isinstance(value, Mapping):
      for key, inner in scalar_metrics(value).items():
        flat[f"{name}/{key}"] = inner
    elif isinstance(value, (int, float, np.number)) or (
        isinstance(value, np.ndarray) and value.ndim == 0):
      flat[name] = float(value)
  return flat


class _TaskIsolatingEvaluator(seqio.Evaluator):
  """seqio's Evaluator, where a task whose metrics raise costs that task only.

  seqio computes every task's metrics in one loop and re-raises the first error,
  losing the other tasks' results; this records the failure per task instead
  (`failures`, {task: reason}) and gives the task no metrics.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.failures: Dict[str, str] = {}

  def _compute_clu_metrics(self, task, task_output, step=None):
    try:
      return super()._compute_clu_metrics(task, task_output, step)
    except Exception as error:  # pylint: disable=broad-except  # a task's own metric code
      self.failures[task.name] = f"{type(error).__name__}: {error}"
      logging.exception("eval step %s: the metrics of task %r raised; its results are left "
                        "out of this evaluation", step, task.name)
      return None


@gin.configurable(denylist=["model", "partitioner", "params_sharding"])
class ModelEvaluator:
  """Evaluates parameters of `model` on a seqio task or mixture.

  Args:
    model: a `PaliModel`.
    partitioner: the run's `Partitioner`.
    params_sharding: shardings of the (full) parameter tree.
    dataset_cfg: a `DatasetConfig`; its split, task_feature_lengths and batch_size
      (global, all hosts) are used; `shuffle` and `seed` pick the examples when
      `num_examples` limits them.
    output_dir: where metrics.json and predictions/ go.
    num_examples: evaluate at most this many examples per task (None: all).
    decoder_params: passed to `predict_batch_with_aux` (e.g. {'decoding': 'beam'}).
    writer: a clu metric writer for TensorBoard scalars (optional).
    mix_tasks: fill each batch with examples of any task (a specialist bank serves
      each row with its own task's specialist); False: one task per batch. The
      predictions, metrics and files are the same either way.
    tune_input_pipeline: let tf.data rewrite and autotune the evaluation batches' pipeline
      (its defaults). False skips both: on an evaluation of a few dozen small examples
      the rewrites and the autotuner's threads cost more than the pass itself (the
      tests' tiny runs: 1.8 s of CPU a pass tuned, 1.0 s untuned; on 2 loaded cores
      4.3 s of wall time against 1.0 s). The batches are the same either way.
  """

  def __init__(self, model, partitioner, params_sharding, dataset_cfg, output_dir: str,
               num_examples: Optional[int] = None,
               decoder_params: Optional[Mapping[str, Any]] = None, writer=None,
               mix_tasks: bool = True, tune_input_pipeline: bool = True):
    self.model = model
    self.mix_tasks = mix_tasks
    self.tune_input_pipeline = tune_input_pipeline
    self.partitioner = partitioner
    self.dataset_cfg = dataset_cfg
    self.output_dir = output_dir
    self.writer = writer
    self.batch_size = dataset_cfg.batch_size
    if self.batch_size % jax.process_count() or self.batch_size % partitioner.data_parallel_size:
      raise ValueError(f"eval batch size {self.batch_size} is not divisible by the "
                       f"{jax.process_count()} processes and the data-parallel mesh size "
                       f"{partitioner.data_parallel_size}")
    image_size = model.config.vision.image_size if model.config.vision else 224
    self.last_failures: Dict[str, str] = {}  # {task: reason} of the last evaluation
    self.evaluator = _TaskIsolatingEvaluator(
        mixture_or_task_name=dataset_cfg.mixture_or_task_name,
        feature_converter=PaliFeatureConverter(
            image_size=image_size, pix2struct_patching=model.config.pix2struct_patching),
        eval_split=dataset_cfg.split, use_cached=dataset_cfg.use_cached,
        seed=dataset_cfg.seed, sequence_length=dataset_cfg.task_feature_lengths or None,
        num_examples=num_examples, shuffle=bool(num_examples and dataset_cfg.shuffle),
        logger_cls=(PredictionsJsonlLogger,), log_dir=output_dir,
        async_compute_metrics=False)
    if not self.evaluator.eval_tasks:
      raise ValueError(f"{dataset_cfg.mixture_or_task_name!r} has no task with metrics and "
                       f"a {dataset_cfg.split!r} split to evaluate")
    self.params_sharding = params_sharding
    self.decoder_params = dict(decoder_params or {}) or None
    self._jitted = {}

  @property
  def task_names(self) -> List[str]:
    return [task.name for task in self.evaluator.eval_tasks]

  def _batches(self, dataset: tf.data.Dataset):
    """(keys, this host's rows of the global batch, number of real rows).

    `dataset` yields (key, features); a key is an example's index, or a tuple of
    them (`task_mixing.tagged_union`: (task row, index)).
    """
    per_host = self.batch_size // jax.process_count()
    start = jax.process_index() * per_host
    batched = dataset.batch(self.batch_size)
    if not self.tune_input_pipeline:
      batched = batched.with_options(_UNTUNED)
    for keys, features in tfds.as_numpy(batched):
      real = len(jax.tree_util.tree_leaves(keys)[0])
      if real < self.batch_size:  # pad the last batch: one compiled shape
        features = {k: np.concatenate([v, np.repeat(v[-1:], self.batch_size - real, 0)])
                    for k, v in features.items()}
      local = {k: v[start:start + per_host] for k, v in features.items()}
      yield keys, local, real

  def _predict(self, params, batch):
    tokens, aux = self.model.predict_batch_with_aux(params, batch,
                                                    decoder_params=self.decoder_params)
    return tokens, aux["scores"]

  def _score(self, params, batch):
    return self.model.score_batch(params, batch)

  def _run(self, name: str, fn, params, dataset) -> List[Tuple[int, Any]]:
    results = []
    for keys, local, real in self._batches(dataset):
      batch = self.partitioner.global_batch(local, self.batch_size)
      if name not in self._jitted:
        self._jitted[name] = partitioned_step.jit_params_fn(
            self.partitioner, fn, self.params_sharding, self.partitioner.batch_sharding(local),
            key=(name, self.model.fingerprint,
                 program_cache.fingerprint(self.decoder_params)))
      outputs = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)),
                                       self._jitted[name](params, batch))
      results.extend(zip(_rows(keys, real), _rows(outputs, real)))  # padding rows dropped
    return results

  def _outputs_fn(self, name: str, fn, params):
    """dataset -> [(index, output)]: run alone, or read from the tasks' mixed batches."""
    if not self.mix_tasks:
      return lambda dataset: self._run(name, fn, params, dataset)
    datasets = self.evaluator.cached_model_datasets
    mixed = task_mixing.MixedOutputs(
        lambda union: self._run(name, fn, params, union),
        {task: datasets[task]
         for task in task_mixing.tasks_needing(self.evaluator.eval_tasks, name)})
    return mixed.for_dataset

  def evaluate(self, params, step: int) -> Dict[str, Dict[str, float]]:
    """{task: {metric: value}} of `params`, also written to disk (and TensorBoard)."""
    predictions = self._outputs_fn("predict", self._predict, params)
    scores = self._outputs_fn("score", self._score, params)

    def predict_fn(dataset, model_feature_shapes=None):
      # Fixed-length rows (seqio stacks them); its vocabulary's decode stops at EOS.
      del model_feature_shapes
      return [(index, tokens.tolist()) for index, (tokens, _) in predictions(dataset)]

    def score_fn(dataset, model_feature_shapes=None):
      del model_feature_shapes
      return [(index, float(score)) for index, score in scores(dataset)]

    self.evaluator.failures.clear()
    future, _ = self.evaluator.evaluate(compute_metrics=True, step=step,
                                        predict_fn=predict_fn, score_fn=score_fn)
    results = {task: scalar_metrics(metrics) for task, metrics in future.result().items()
               if metrics is not None}
    self.last_failures = dict(self.evaluator.failures)
    self._record(step, results)
    return results

  def _record(self, step: int, results: Mapping[str, Mapping[str, float]]) -> None:
    if jax.process_index() != 0:
      return
    tf.io.gfile.makedirs(self.output_dir)
    path = os.path.join(self.output_dir, METRICS_FILE)
    history = {}
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path) as f:
        history = json.load(f)
    history[str(step)] = results
    write_json_atomically(path, history)
    for task, metrics in results.items():
      logging.info("eval step %d %s: %s", step, task,
                   ", ".join(f"{k}={v:.2f}" for k, v in sorted(metrics.items())),
                   extra=console.FILE_ONLY)
    main_values = [metrics[tables.main_metric(metrics)] for metrics in results.values()
                   if metrics]
    logging.info("eval step %d: %d tasks, mean of their main metrics %.2f (per task: %s)",
                 step, len(results), float(np.mean(main_values)) if main_values else 0.0,
                 path)
    if self.writer is not None:
      self.writer.write_scalars(step, {f"{task}/{name}": value
                                       for task, metrics in results.items()
                                       for name, value in metrics.items()})
      self.writer.flush()


def _untuned_options() -> tf.data.Options:
  """tf.data options without the default graph rewrites and without the autotuner."""
  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = False
  options.autotune.enabled = False
  return options


_UNTUNED = _untuned_options()


def _rows(outputs, real: int):
  """The first `real` rows of a batched array or tuple of arrays (a tuple per row)."""
  if isinstance(outputs, tuple):
    return list(zip(*[list(o[:real]) for o in outputs]))
  return list(outputs[:real])


def read_metrics(output_dir: str) -> Dict[str, Dict[str, Dict[str, float]]]:
  with tf.io.gfile.GFile(os.path.join(output_dir, METRICS_FILE)) as f:
    return json.load(f)
