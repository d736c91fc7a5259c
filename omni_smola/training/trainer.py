"""The training loop: set-up, resume, steps, logging, checkpoints, evaluation, faults.

`train` is what `python -m omni_smola.train` runs; gin binds its arguments
(see gin_configs/runs/*.gin). In order, it

1. checks its inputs (task names, paths, sizes) before touching MODEL_DIR, so a
   bad config fails fast and leaves nothing half-written;
2. builds the mesh and derives every sharding from logical axis names;
3. resumes from the latest checkpoint in MODEL_DIR (parameters, optimizer
   state, step, input position), or initialises: fresh parameters, the
   backbone from INITIAL_CHECKPOINT_PATH when given, with the adapters it holds
   (a generalist's under a specialist, stage 1's MoVE and MoLE), the others fresh;
4. splits parameters into trainable (optimised) and frozen (closed over);
5. steps, logging metric sums every `log_period` steps, checkpointing every
   `CheckpointConfig.period` steps, evaluating every `eval_period` steps
   (and keeping the best checkpoint by average validation score under
   MODEL_DIR/best/, `best_checkpoint.py`), stopping cleanly on SIGTERM and
   loudly on a non-finite loss.

What survives a fault (DESIGN.md, "Faults: what survives"): a killed run resumes
from its last complete checkpoint, an unreadable latest checkpoint is set aside
for the one before (`RunCheckpointer.restore_latest_readable`), a failed write
stops the run with `CheckpointWriteError` and the previous checkpoint intact, an
evaluation that raises is logged and training goes on, and examples dropped for
unreadable images are counted in the train metrics (`skipped_examples`).
"""
import dataclasses
import functools
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging
from flax import traverse_util
import gin
import jax
import numpy as np
import seqio

from omni_smola import param_layout
from omni_smola.checkpoints import mole_stage_two, vision_tower_sources
from omni_smola.data import images
from omni_smola.training import best_checkpoint, checkpointing, data_iterator, faults
from omni_smola.training import metrics_logging, microbatches
from omni_smola.training import optimizers, partitioned_step
from omni_smola.training.train_state import (TrainState, count_parameters, merge_params,
                                             split_params)

# Parameters a backbone checkpoint never has besides adapters: the specialist's LoRA.
DEFAULT_ALLOW_MISSING = (r"(^|/)specialist_adapter/",)


class MissingSettingError(ValueError):
  """A required setting (gin macro or argument) was not given."""


@dataclasses.dataclass
class TrainResult:
  step: int
  preempted: bool = False
  loss_history: List[Tuple[int, float]] = dataclasses.field(default_factory=list)
  eval_results: Dict[int, Dict[str, Dict[str, float]]] = dataclasses.field(
      default_factory=dict)
  # {step: {task or "evaluation": reason}} of the evaluations that raised (training went on)
  eval_failures: Dict[int, Dict[str, str]] = dataclasses.field(default_factory=dict)


def input_shapes(model, cfg: data_iterator.DatasetConfig, batch_size: int = 1):
  """Model input shapes for initialisation (parameters do not depend on the batch)."""
  lengths = cfg.task_feature_lengths
  missing = {"inputs", "targets"} - set(lengths)
  if missing:
    raise ValueError(f"TASK_FEATURE_LENGTHS needs lengths for {sorted(missing)}, got "
                     f"{lengths}")
  shapes = {"encoder_input_tokens": (batch_size, lengths["inputs"]),
            "decoder_input_tokens": (batch_size, lengths["targets"])}
  if model.config.vision is not None:
    size = model.config.vision.image_size
    shapes["image"] = (batch_size, size, size, 3)
  return shapes


def image_size_of(model) -> int:
  return model.config.vision.image_size if model.config.vision is not None else 224


@dataclasses.dataclass
class _Layout:
  """Abstract parameters, the trainable mask and every sharding of a run."""
  abstract_params: Any
  params_sharding: Any
  mask: Any
  trainable_sharding: Any
  frozen_sharding: Any
  opt_sharding: Any
  state_sharding: TrainState


def plan_layout(model, partitioner, tx, shapes, trainable_mode: str,
                trainable_overrides: Sequence[Tuple[str, bool]],
                tx_spec: Optional[str] = None) -> _Layout:
  abstract = partitioned_step.abstract_variables(model, shapes)
  params_sharding = partitioner.variables_sharding(abstract)["params"]
  mask = model.trainable_mask(abstract["params"], trainable_mode, tuple(trainable_overrides))
  mask = param_layout.unbox(mask)
  abstract_params = param_layout.unbox(abstract["params"])
  if not any(jax.tree_util.tree_leaves(mask)):
    raise ValueError(f"trainable mode {trainable_mode!r} with overrides {trainable_overrides} "
                     "leaves no parameter to train (does the adapter config add any?)")
  trainable_sharding, frozen_sharding = split_params(params_sharding, mask)
  abstract_trainable, _ = split_params(
      partitioned_step.with_sharding(abstract_params, params_sharding), mask)
  opt_sharding = partitioner.opt_state_sharding(tx, abstract_trainable, trainable_sharding,
                                                tx_spec)
  state_sharding = partitioned_step.train_state_sharding(partitioner, trainable_sharding,
                                                         opt_sharding)
  return _Layout(abstract_params, params_sharding, mask, trainable_sharding,
                 frozen_sharding, opt_sharding, state_sharding)


def _abstract_checkpoint(layout: _Layout, tx) -> Dict[str, Any]:
  """The restore target of `TrainState.to_checkpoint`, with shardings."""
  params = partitioned_step.with_sharding(layout.abstract_params, layout.params_sharding)
  trainable, _ = split_params(params, layout.mask)
  opt_state = jax.eval_shape(tx.init, trainable)
  opt_state = partitioned_step.with_sharding(opt_state, layout.opt_sharding)
  step = jax.ShapeDtypeStruct((), np.int32, sharding=layout.state_sharding.step)
  return {"step": step, "params": params, "opt_state": opt_state}


def _validate(model_dir, train_dataset_cfg, infer_eval_dataset_cfg, train_steps,
              initial_checkpoint_path, resuming, num_microbatches=1) -> None:
  if not model_dir:
    raise MissingSettingError("MODEL_DIR is not set: pass --gin.MODEL_DIR=/path/to/run")
  if not isinstance(train_steps, int) or train_steps < 1:
    raise MissingSettingError(f"TRAIN_STEPS must be a positive integer, got {train_steps!r}")
  microbatches.check_num_microbatches(num_microbatches, train_dataset_cfg.batch_size,
                                      jax.process_count(), "host")
  data_iterator.check_registered(train_dataset_cfg.mixture_or_task_name,
                                 train_dataset_cfg.module)
  if infer_eval_dataset_cfg is not None:
    data_iterator.check_registered(infer_eval_dataset_cfg.mixture_or_task_name,
                                   infer_eval_dataset_cfg.module)
  images.check_corrupt_image_overrides(
      task.name for cfg in (train_dataset_cfg, infer_eval_dataset_cfg) if cfg is not None
      for task in seqio.get_subtasks(seqio.get_mixture_or_task(cfg.mixture_or_task_name)))
  if initial_checkpoint_path and not resuming:
    checkpointing.resolve_checkpoint(initial_checkpoint_path)


def _write_operative_config(model_dir: str) -> None:
  """MODEL_DIR/config.gin: the bindings this run used (when gin configured it)."""
  if jax.process_index() != 0 or not gin.config_is_locked():
    return
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, "config.gin"), "w") as f:
    f.write(gin.operative_config_str())


def _evaluate(evaluator, params, step: int
              ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, str]]:
  """(results, {task: reason} of what raised): an evaluation never stops training.

  A task whose metrics raise is left out by the evaluator; anything else that raises
  (prediction, the data) loses this evaluation, logged, and the next one runs.
  """
  try:
    results = evaluator.evaluate(params, step)
  except Exception as error:  # pylint: disable=broad-except
    logging.exception("The evaluation at step %d failed over tasks %s; training goes on",
                      step, evaluator.task_names)
    return {}, {"evaluation": f"{type(error).__name__}: {error}"}
  return results, dict(evaluator.last_failures)


def _skipped_examples_counter() -> Callable[[], Dict[str, float]]:
  """The train metrics' counts of examples dropped for unreadable images since now.

  `skipped_examples` in all, and `skipped_examples/<task>` per task; the pipeline
  reads ahead, so the count includes batches prefetched but not yet trained on.
  """
  baseline = images.skipped_image_counts()

  def counts() -> Dict[str, float]:
    now = images.skipped_image_counts()
    per_task = {task: now[task] - baseline.get(task, 0) for task in now}
    scalars = {f"skipped_examples/{task}": float(n) for task, n in per_task.items() if n}
    scalars["skipped_examples"] = float(sum(per_task.values()))
    return scalars

  return counts


@gin.configurable(denylist=["callbacks"])
def train(*, model, model_dir: str, train_dataset_cfg: data_iterator.DatasetConfig,
          train_steps: int,
          optimizer: Optional[optimizers.Optimizer] = None,
          trainable_mode: str = "adapters",
          trainable_overrides: Sequence[Tuple[str, bool]] = (),
          partitioner: Optional[partitioned_step.Partitioner] = None,
          checkpoint_cfg: Optional[checkpointing.CheckpointConfig] = None,
          initial_checkpoint_path: Optional[str] = None,
          initial_checkpoint_allow_missing: Sequence[str] = DEFAULT_ALLOW_MISSING,
          initial_checkpoint_ignore_unexpected: bool = False,
          vision_tower_checkpoints: Optional[Dict[str, Any]] = None,
          mole_experts_from_single_adapter: bool = False,
          infer_eval_dataset_cfg: Optional[data_iterator.DatasetConfig] = None,
          eval_period: int = 0,
          eval_num_examples: Optional[int] = None,
          eval_output_dir: Optional[str] = None,
          log_period: int = 10,
          random_seed: int = 0,
          on_nonfinite_loss: str = "stop",
          num_microbatches: int = 1,
          callbacks: Sequence[Callable[[int], None]] = ()) -> TrainResult:
  """Trains `model` on `train_dataset_cfg` for `train_steps` steps (resuming if it can).

  Args:
    model: a `PaliModel` (t5x's model API).
    model_dir: MODEL_DIR: checkpoints/, adapters/, train/ and eval/ logs go here.
    train_dataset_cfg: the training `DatasetConfig` (global batch size).
    train_steps: TRAIN_STEPS, the total (not additional) number of steps.
    optimizer: `create_optimizer()` as gin configures it by default.
    trainable_mode: 'adapters' (frozen backbone) or 'full'.
    trainable_overrides: (regex, trainable) pairs over parameter paths, first
      match wins (e.g. the specialist recipe freezes everything but its LoRA).
    partitioner: the mesh and rules (`Partitioner()` as gin configures it).
    checkpoint_cfg: period, keep-N, async, keep-best (`CheckpointConfig()`).
      With `keep_best` (the default) each evaluation that beats every earlier
      one (average over tasks of each task's main metric) is kept under
      MODEL_DIR/best/; a run that does not evaluate (`eval_period` 0 or no
      `infer_eval_dataset_cfg`) logs one warning naming both and keeps none.
    initial_checkpoint_path: INITIAL_CHECKPOINT_PATH, read when not resuming:
      our own checkpoints or any format `load_pretrained` reads; parameters it
      lacks must be adapters or match `initial_checkpoint_allow_missing`.
    vision_tower_checkpoints: VISION_TOWER_CHECKPOINTS of a MoME model, `{tower: path or
      (path, subtree)}`, read when not resuming (`checkpoints.vision_tower_sources`); a
      frozen tower that neither it nor the initial checkpoint fills is an error.
    mole_experts_from_single_adapter: MoME's stage 2: the initial checkpoint is a
      stage-1 run (MoLE with one expert), whose adapter becomes every expert of this
      model's MoLE (`checkpoints.mole_stage_two`); needs an initial checkpoint and
      `BottleneckMoLEConfig.num_experts >= 2`.
    infer_eval_dataset_cfg: what to evaluate every `eval_period` steps.
    eval_num_examples: at most this many examples per evaluated task.
    eval_output_dir: default MODEL_DIR/eval.
    log_period: steps between metric logs.
    random_seed: RANDOM_SEED: parameter initialisation and dropout.
    on_nonfinite_loss: 'stop' (raise `NonFiniteLossError`) or 'skip' the update.
    num_microbatches: NUM_MICROBATCHES: accumulate each step's gradient over this
      many slices of the batch (`microbatches.py`; the same update, less
      activation memory); it must divide the per-host and per-device batch.
    callbacks: called with the step number after every step (not gin-bound).
  """
  optimizer = optimizer if optimizer is not None else optimizers.create_optimizer()
  checkpoint_cfg = checkpoint_cfg or checkpointing.CheckpointConfig()
  checkpointer = checkpointing.RunCheckpointer(model_dir or "", checkpoint_cfg)
  latest = checkpointer.latest_step() if model_dir else None
  _validate(model_dir, train_dataset_cfg, infer_eval_dataset_cfg, train_steps,
            initial_checkpoint_path, resuming=latest is not None,
            num_microbatches=num_microbatches)
  if mole_experts_from_single_adapter:
    mole_stage_two.check_model(model.config)
    if not initial_checkpoint_path:
      raise MissingSettingError(f"{mole_stage_two.SETTING} = True needs the stage-1 run as "
                                "INITIAL_CHECKPOINT_PATH")
  if latest is not None and latest >= train_steps:
    # Before building anything: a finished run relaunched (a second `make demo`, a pod
    # job restarted after its last step) exits at once instead of restoring its state.
    logging.info("Step %d already reaches TRAIN_STEPS=%d: nothing to train", latest,
                 train_steps)
    checkpointer.close()
    return TrainResult(step=latest)
  partitioner = partitioner if partitioner is not None else partitioned_step.Partitioner()
  data_iterator.check_batch_size(train_dataset_cfg.batch_size, partitioner.data_parallel_size)
  microbatches.check_num_microbatches(num_microbatches, train_dataset_cfg.batch_size,
                                      partitioner.data_parallel_size, "device")
  tx = optimizer.tx
  step_fn = partitioned_step.make_train_step(model, tx, optimizer.learning_rate,
                                             on_nonfinite_loss, num_microbatches)

  layout = plan_layout(model, partitioner, tx, input_shapes(model, train_dataset_cfg),
                       trainable_mode, trainable_overrides, optimizer.spec)
  rng = jax.random.PRNGKey(random_seed)
  init_rng, dropout_rng = jax.random.split(rng)
  position = None
  if latest is not None:
    latest, restored, position = checkpointer.restore_latest_readable(
        _abstract_checkpoint(layout, tx))
    logging.info("Resuming from the checkpoint of step %d in %s", latest, checkpointer.directory)
    trainable, frozen = split_params(restored["params"], layout.mask)
    state = TrainState(step=restored["step"], trainable=trainable,
                       opt_state=restored["opt_state"])
  else:
    def fresh_params(keep=None, keep_key=None):
      return partitioned_step.init_params(partitioner, model, init_rng,
                                          input_shapes(model, train_dataset_cfg),
                                          layout.params_sharding, keep=keep, keep_key=keep_key)

    def may_be_missing(path):
      """What a pretrained checkpoint may lack (the rest is never initialised)."""
      name = "/".join(path)
      return param_layout.is_adapter_path(path) or any(
          re.search(p, name) for p in initial_checkpoint_allow_missing)

    mask = {"/".join(k): v for k, v in traverse_util.flatten_dict(layout.mask).items()}
    towers = vision_tower_sources.TowerFill(dict(getattr(model.config, "vision_towers", ())),
                                            vision_tower_checkpoints,
                                            checkpointing.resolve_checkpoint)

    def check_towers(loaded):
      towers.check_filled(mask, lambda name: not mask[name], loaded, initial_checkpoint_path)

    if initial_checkpoint_path:
      logging.info("Initialising from %s (what it lacks of the adapters: fresh)%s",
                   initial_checkpoint_path,
                   "; every MoLE expert a copy of its single adapter"
                   if mole_experts_from_single_adapter else "")
      initial_checkpoint_allow_missing = (tuple(initial_checkpoint_allow_missing)
                                          + towers.allow_missing)
      params = checkpointing.restore_params(
          initial_checkpoint_path,
          partitioned_step.with_sharding(layout.abstract_params, layout.params_sharding),
          allow_missing=initial_checkpoint_allow_missing,
          ignore_unexpected=initial_checkpoint_ignore_unexpected,
          init_fn=lambda: fresh_params(
              keep=may_be_missing,
              keep_key=("adapters and", tuple(initial_checkpoint_allow_missing))),
          frozen=lambda name: not mask[name] and not towers.fills(name),
          check_loaded=check_towers,
          adapt_loaded=(functools.partial(mole_stage_two.experts_from_stage_one,
                                          target=layout.abstract_params,
                                          checkpoint=initial_checkpoint_path)
                        if mole_experts_from_single_adapter else None))
    else:
      check_towers({})
      params = fresh_params()
    params = towers.fill(params)
    trainable, frozen = split_params(params, layout.mask)
    opt_state = partitioned_step.init_opt_state(partitioner, tx, trainable, layout.opt_sharding,
                                                optimizer.spec)
    state = TrainState(step=partitioned_step.replicate(partitioner, np.int32(0)),
                       trainable=trainable, opt_state=opt_state)
  logging.info("Parameters: %s trainable, %s frozen; optimizer state: %s values",
               f"{count_parameters(trainable):,}", f"{count_parameters(frozen):,}",
               f"{count_parameters(state.opt_state):,}")

  start = int(np.asarray(jax.device_get(state.step)))
  result = TrainResult(step=start)
  skipped_examples = _skipped_examples_counter()  # before the pipeline starts reading
  if position is None:
    batches = data_iterator.TrainBatches(train_dataset_cfg, image_size_of(model),
                                         partitioner.data_parallel_size,
                                         pix2struct_patching=model.config.pix2struct_patching)
  else:
    batches = data_iterator.resume(train_dataset_cfg, image_size_of(model),
                                   partitioner.data_parallel_size, position,
                                   *checkpointer.data_iterator_state(latest),
                                   pix2struct_patching=model.config.pix2struct_patching)
  example = next(batches)
  jitted = partitioned_step.jit_train_step(
      partitioner, step_fn, layout.state_sharding, layout.frozen_sharding,
      partitioner.batch_sharding(example),
      key=partitioned_step.train_step_key(model, optimizer, on_nonfinite_loss,
                                          num_microbatches))
  rng_arg = partitioned_step.replicate(partitioner, dropout_rng)
  evaluator = None
  if eval_period and infer_eval_dataset_cfg is not None:
    # pylint: disable-next=g-import-not-at-top
    from omni_smola.evaluation import evaluator as evaluator_lib
    evaluator = evaluator_lib.ModelEvaluator(
        model, partitioner, layout.params_sharding, infer_eval_dataset_cfg,
        eval_output_dir or os.path.join(model_dir, "eval"), num_examples=eval_num_examples,
        writer=metrics_logging.create_writer(model_dir, "eval"))
  best_keeper = best_checkpoint.keeper_for_run(model_dir, checkpoint_cfg.keep_best,
                                               eval_period, infer_eval_dataset_cfg is not None)
  logger = metrics_logging.TrainMetricsLogger(model_dir, train_steps,
                                              train_dataset_cfg.batch_size,
                                              counters=skipped_examples)
  _write_operative_config(model_dir)
  last_saved = latest
  pending: Optional[Tuple[int, Dict[str, Any]]] = None

  def absorb(entry):
    """Fetches a step's metrics (one step late, so the host never stalls the device)."""
    step, metrics = entry
    metrics = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), metrics)
    if on_nonfinite_loss == "stop" and metrics["nonfinite"]:
      raise faults.NonFiniteLossError(faults.nonfinite_message(
          step, float(metrics["step_loss"]), last_saved, checkpointer.directory))
    if metrics["nonfinite"]:
      logging.warning("step %d: non-finite loss %s, update skipped", step,
                      metrics["step_loss"])
    logger.add(metrics)

  step = start
  try:
    with faults.PreemptionWatcher() as watcher:
      while step < train_steps:
        batch = example if example is not None else next(batches)
        example = None
        state, metrics = jitted(state, frozen, partitioner.global_batch(
            batch, train_dataset_cfg.batch_size), rng_arg)
        step += 1
        if pending is not None:
          absorb(pending)
        pending = (step, metrics)
        if step == start + 1:
          absorb(pending)  # the first step compiles: time the rest
          pending = None
          logger.reset_clock()
        for callback in callbacks:
          callback(step)
        preempted = watcher.reached(step)
        log_now = step % log_period == 0 or step == train_steps
        save_now = checkpointer.should_save(step) or step == train_steps or preempted
        eval_now = evaluator is not None and (step % eval_period == 0 or step == train_steps)
        if pending is not None and (log_now or save_now or eval_now):
          absorb(pending)
          pending = None
        if log_now:
          logger.write(step)
        if save_now:
          saved = state.to_checkpoint(frozen)
          checkpointer.save(step, saved, batches.position(), params=saved["params"],
                            data_iterator=batches.checkpointable)
          last_saved = step
        if eval_now:
          results, failures = _evaluate(evaluator, merge_params(state.trainable, frozen), step)
          result.eval_results[step] = results
          if failures:
            result.eval_failures[step] = failures
          elif best_keeper is not None:  # an average over fewer tasks is not comparable
            best_keeper.offer(step, results, lambda: state.to_checkpoint(frozen),
                              batches.position())
          logger.reset_clock()
        if preempted:
          logging.warning("Preempted: checkpoint of step %d saved; exiting", step)
          result.preempted = True
          break
  finally:
    checkpointer.close()
    if best_keeper is not None:
      best_keeper.close()
    logger.close()
  result.step = step
  result.loss_history = list(logger.history)
  return result
