r"""Evaluates checkpoints: `python -m omni_smola.eval --gin_file=... --gin.CHECKPOINT_PATH=...`.

    python -m omni_smola.eval \
      --gin_file=experiments/mini_eval.gin \
      --gin.CHECKPOINT_PATH=/tmp/runs/generalist --gin.EVAL_OUTPUT_DIR=/tmp/runs/eval

CHECKPOINT_PATH is a MODEL_DIR (its latest checkpoint), a `checkpoints/` dir, a
MODEL_DIR's `best/` (its best by average validation score), one step dir, or a
backbone checkpoint in any format `load_pretrained` reads; with
EVAL_ALL_CHECKPOINTS every checkpoint of the directory is evaluated. With
runs/serve_specialists.gin, SPECIALISTS ({task: specialist run}) replaces it: one model
serves every task with its own specialist. Examples of every task share batches
(`ModelEvaluator.mix_tasks`, default True; `evaluation/task_mixing.py`), so only the
last batch is padded and, under a bank, each row gathers its own task's specialist. Writes
EVAL_OUTPUT_DIR/metrics.json ({step: {task: {metric: value}}}) and
EVAL_OUTPUT_DIR/predictions/<task>-<step>.jsonl.
"""

import sys

if __name__ == "__main__":
  from omni_smola import console  # pylint: disable=g-import-not-at-top
  console.hold_native_stderr()  # before TensorFlow loads and prints its start-up lines
  # Run as `python -m omni_smola.eval`: gin files `import omni_smola.eval`, which must be
  # this module (not a second copy defining its flags and configurables again).
  sys.modules.setdefault("omni_smola.eval", sys.modules[__name__])

from typing import Any, Dict, Mapping, Optional

from absl import logging
import gin
import jax
import seqio

from omni_smola import console
from omni_smola import launching
from omni_smola import param_layout
from omni_smola.checkpoints import specialist_bank
from omni_smola.evaluation import tables
from omni_smola.evaluation.evaluator import ModelEvaluator
from omni_smola.training import checkpointing, data_iterator, partitioned_step, trainer


@gin.configurable(module="omni_smola.eval")
def evaluate(*, model, dataset_cfg: data_iterator.DatasetConfig, checkpoint_path: str,
             output_dir: str, all_checkpoints: bool = False,
             num_examples: Optional[int] = None,
             decoder_params: Optional[Mapping[str, Any]] = None,
             partitioner: Optional[partitioned_step.Partitioner] = None,
             allow_missing_adapters: bool = False,
             specialists: Optional[Mapping[str, str]] = None,
             ) -> Dict[int, Dict[str, Dict[str, float]]]:
  """{step: {task: {metric: value}}} of the checkpoint(s) at `checkpoint_path`.

  Args:
    model: the `PaliModel` the checkpoint was trained as (same adapter config).
    dataset_cfg: task or mixture, split, feature lengths, global batch size.
    checkpoint_path: CHECKPOINT_PATH (see the module docstring).
    output_dir: EVAL_OUTPUT_DIR.
    all_checkpoints: evaluate every checkpoint of a MODEL_DIR, oldest first.
    num_examples: at most this many examples per task.
    decoder_params: e.g. {'decoding': 'beam'} (see `PaliModel.predict_batch_with_aux`).
    allow_missing_adapters: evaluate a checkpoint without the model's adapters
      (they stay at their initialisation: the backbone's own outputs).
    specialists: SPECIALISTS, {task: specialist checkpoint}, instead of
      `checkpoint_path`: the model's `task_lora` bank serves each task with its own
      specialist over their shared generalist (runs/serve_specialists.gin,
      `checkpoints.specialist_bank`); reported as step 0.
  """
  if not output_dir:
    raise trainer.MissingSettingError("EVAL_OUTPUT_DIR is not set")
  data_iterator.check_registered(dataset_cfg.mixture_or_task_name, dataset_cfg.module)
  if specialists:
    _check_bank_settings(model, specialists, checkpoint_path, all_checkpoints,
                         allow_missing_adapters)
    tasks = seqio.get_subtasks(seqio.get_mixture_or_task(dataset_cfg.mixture_or_task_name))
    uncovered = sorted({task.name for task in tasks if dataset_cfg.split in task.splits}
                       - set(specialists))
    if uncovered:  # the generalist alone would answer them, silently
      raise ValueError(f"SPECIALISTS has no specialist for the tasks {uncovered} of "
                       f"{dataset_cfg.mixture_or_task_name!r}")
    checkpoints = []
  else:
    checkpoints = (checkpointing.all_checkpoints(checkpoint_path) if all_checkpoints
                   else [(None, checkpointing.resolve_checkpoint(checkpoint_path))])
  partitioner = partitioner if partitioner is not None else partitioned_step.Partitioner()
  shapes = trainer.input_shapes(model, dataset_cfg)
  abstract = partitioned_step.abstract_variables(model, shapes)
  params_sharding = partitioner.variables_sharding(abstract)["params"]
  fresh = None
  if allow_missing_adapters:
    fresh = partitioned_step.init_params(partitioner, model, jax.random.PRNGKey(0), shapes,
                                         params_sharding)
  target = fresh if fresh is not None else partitioned_step.with_sharding(
      param_layout.unbox(abstract["params"]), params_sharding)
  # Read before the evaluator makes EVAL_OUTPUT_DIR: a bad bank leaves nothing behind.
  bank = specialist_bank.load_bank(specialists, target, model.adapters) if specialists else None
  evaluator = ModelEvaluator(model, partitioner, params_sharding, dataset_cfg, output_dir,
                             num_examples=num_examples, decoder_params=decoder_params)
  if bank is not None:
    logging.info("Evaluating the bank of %d specialists on %d tasks", len(specialists),
                 len(evaluator.task_names))
    return {0: evaluator.evaluate(bank, 0)}
  results = {}
  for step, path in checkpoints:
    step = checkpointing.step_of(path) if step is None else step
    logging.info("Evaluating %s (step %d) on %d tasks", path, step, len(evaluator.task_names))
    logging.info("Tasks: %s", evaluator.task_names, extra=console.FILE_ONLY)
    params = checkpointing.restore_params(path, target,
                                          require_adapters=not allow_missing_adapters)
    results[step] = evaluator.evaluate(params, max(step, 0))
  return results


def _check_bank_settings(model, specialists, checkpoint_path, all_checkpoints,
                         allow_missing_adapters) -> None:
  """A bank's parameters all come from SPECIALISTS; settings that say otherwise are errors."""
  if checkpoint_path:
    raise ValueError(f"CHECKPOINT_PATH={checkpoint_path!r} and SPECIALISTS are both set: a "
                     "bank takes its generalist from the specialists' checkpoints; set "
                     "CHECKPOINT_PATH = None (runs/serve_specialists.gin does)")
  for name, value in (("EVAL_ALL_CHECKPOINTS", all_checkpoints),
                      ("evaluate.allow_missing_adapters", allow_missing_adapters)):
    if value:
      raise ValueError(f"{name} = True does not apply to a bank of SPECIALISTS")
  specialist_bank.check_bank_plan(model.adapters, specialists)


def main(argv):
  results = launching.run_configured(argv, "eval", "EVAL_OUTPUT_DIR", evaluate)
  if jax.process_index() == 0:
    steps = sorted(results)
    print(tables.format_table({f"step {step}": results[step] for step in steps},
                              [f"step {step}" for step in steps]), flush=True)


def console_entry_point():
  launching.run(main)


if __name__ == "__main__":
  console_entry_point()
