"""Several tasks' eval examples in shared batches, their outputs handed back per task.

seqio's Evaluator asks for each task's outputs in turn (`predict_fn(task's dataset)`), so
evaluating task by task pads the last batch of every task: nine tasks of 100 examples at
batch 32 run 36 batches, 22% of their rows padding. Mixed, the same examples run in 29,
and only the very last batch is padded. The model serves every row on its own (no layer
mixes examples: routers and a specialist bank read each example's own tokens and
`task_id`), so a row's output does not depend on which task its neighbours belong to.

    union = tagged_union({task: dataset})       elements ((task row, index), features)
    outputs = MixedOutputs(run, datasets)       run(union) -> [((task row, index), output)]
    outputs.for_dataset(dataset)                -> [(index, output)] of that task

`MixedOutputs` runs the union once per kind of output (prediction, score), the first time
seqio asks for any task's, over the tasks whose metrics need that kind.
"""
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import seqio
import tensorflow as tf

Rows = List[Tuple[Any, Any]]

# What each kind of output is called in seqio: which tasks' metrics read it.
OUTPUT_TYPES = {"predict": seqio.metrics.ModelOutputType.PREDICTION,
                "score": seqio.metrics.ModelOutputType.SCORE}


def tagged_union(datasets: Sequence[tf.data.Dataset]) -> tf.data.Dataset:
  """The enumerated datasets one after another, each element keyed by (task row, index)."""
  tagged = [dataset.map(lambda index, features, row=row: ((tf.constant(row, tf.int64), index),
                                                          features))
            for row, dataset in enumerate(datasets)]
  union = tagged[0]
  for dataset in tagged[1:]:
    union = union.concatenate(dataset)
  return union


def tasks_needing(tasks: Sequence[seqio.Task], kind: str) -> List[str]:
  """The names of `tasks` whose metrics read the `kind` output ('predict' or 'score')."""
  return [task.name for task in tasks
          if any(m.model_output_type == OUTPUT_TYPES[kind] for m in task.metric_objs)]


class MixedOutputs:
  """One kind of output of several tasks, computed over shared batches, read per task.

  Args:
    run: the batched model function: a dataset of ((task row, index), features) ->
      [((task row, index), output)], padding rows already dropped.
    datasets: {task: its enumerated model dataset}, the very objects seqio will pass back.
  """

  def __init__(self, run: Callable[[tf.data.Dataset], Rows],
               datasets: Mapping[str, tf.data.Dataset]):
    self._run = run
    self._names = list(datasets)
    self._datasets = [datasets[name] for name in self._names]
    self._outputs = None  # {task: [(index, output)]}, filled on first use

  def for_dataset(self, dataset: tf.data.Dataset) -> Rows:
    """[(index, output)] of the task whose dataset this is (seqio passes its own objects)."""
    matches = [name for name, known in zip(self._names, self._datasets) if known is dataset]
    if not matches:
      raise ValueError("a dataset that is none of the mixed tasks' "
                       f"({', '.join(self._names)}) was asked for its outputs")
    if self._outputs is None:
      self._outputs = {name: [] for name in self._names}
      for (row, index), output in self._run(tagged_union(self._datasets)):
        self._outputs[self._names[int(row)]].append((int(index), output))
    return self._outputs[matches[0]]
