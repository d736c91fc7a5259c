"""Trainer pieces on toy trees: the trainable split, optimizer, schedules, steps, flags, checkpoints."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_smola import launching
from omni_smola.checkpoints.restore import CheckpointMismatchError
from omni_smola.training import checkpointing, optimizers, partitioned_step
from omni_smola.training.train_state import TrainState, merge_params, split_params

PARAMS = {"layer": {"kernel": jnp.ones((4, 3)),
                    "adapter": {"a": jnp.full((4, 2), 0.5), "b": jnp.zeros((2, 3))}},
          "norm": {"scale": jnp.ones((3,))}}
MASK = {"layer": {"kernel": False, "adapter": {"a": True, "b": True}}, "norm": {"scale": False}}


class ToyModel:
  """`loss_fn` of t5x's API over PARAMS-shaped parameters."""

  def loss_fn(self, params, batch, dropout_rng):
    del dropout_rng
    x = batch["x"]
    layer = params["layer"]
    y = x @ layer["kernel"] + x @ layer["adapter"]["a"] @ layer["adapter"]["b"]
    y = y * params["norm"]["scale"]
    total = jnp.sum((y - batch["y"]) ** 2)
    tokens = jnp.asarray(x.shape[0], jnp.float32)
    return total / tokens, {"loss": total, "z_loss": 0.0 * total, "accuracy": 0.0 * total,
                            "num_tokens": tokens, "num_examples": tokens}


def _one_device():
  return partitioned_step.Partitioner(
      mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model")))


def test_split_keeps_only_masked_leaves_and_merge_restores_the_tree():
  trainable, frozen = split_params(PARAMS, MASK)
  assert jax.tree_util.tree_structure(trainable) == jax.tree_util.tree_structure(
      {"layer": {"adapter": {"a": 0, "b": 0}}})
  assert set(frozen) == {"layer", "norm"} and "adapter" not in frozen["layer"]
  merged = merge_params(trainable, frozen)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(PARAMS)


def test_optimizer_state_exists_only_for_trainable_parameters():
  trainable, _ = split_params(PARAMS, MASK)
  for name in ("adafactor", "adamw"):
    state = optimizers.create_optimizer(name, learning_rate=1e-2).tx.init(trainable)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    keyed = [p for p in paths if "['layer']" in p or "['norm']" in p]
    assert keyed and all("['adapter']" in p for p in keyed), (name, paths)


def _step_and_state(on_nonfinite="stop"):
  optimizer = optimizers.create_optimizer("adamw", learning_rate=0.1)
  trainable, frozen = split_params(PARAMS, MASK)
  state = TrainState(step=jnp.int32(0), trainable=trainable,
                     opt_state=optimizer.tx.init(trainable))
  step = jax.jit(partitioned_step.make_train_step(ToyModel(), optimizer.tx,
                                                  optimizer.learning_rate, on_nonfinite))
  return step, state, frozen


def test_a_step_moves_only_trainable_parameters_and_reports_sums():
  step, state, frozen = _step_and_state()
  batch = {"x": jnp.ones((2, 4)), "y": jnp.ones((2, 3))}
  new_state, metrics = step(state, frozen, batch, jax.random.PRNGKey(0))
  assert int(new_state.step) == 1
  # B starts at zero, so A's gradient does too: B moves first (as in LoRA).
  assert not np.allclose(new_state.trainable["layer"]["adapter"]["b"],
                         state.trainable["layer"]["adapter"]["b"])
  assert float(metrics["num_tokens"]) == 2 and float(metrics["nonfinite"]) == 0
  assert float(metrics["learning_rate"]) == pytest.approx(0.1)


def test_skip_policy_leaves_parameters_and_optimizer_state_unchanged_on_nan():
  step, state, frozen = _step_and_state("skip")
  batch = {"x": jnp.full((2, 4), jnp.nan), "y": jnp.ones((2, 3))}
  new_state, metrics = step(state, frozen, batch, jax.random.PRNGKey(0))
  assert float(metrics["nonfinite"]) == 1 and int(new_state.step) == 1
  for new, old in zip(jax.tree_util.tree_leaves((new_state.trainable, new_state.opt_state)),
                      jax.tree_util.tree_leaves((state.trainable, state.opt_state))):
    np.testing.assert_array_equal(new, old)


def test_schedules_warm_up_linearly_then_decay():
  rsqrt = optimizers.learning_rate_schedule("rsqrt", peak_value=1.0, warmup_steps=100)
  assert float(rsqrt(50)) == pytest.approx(0.5)
  assert float(rsqrt(100)) == pytest.approx(1.0)
  assert float(rsqrt(400)) == pytest.approx(0.5)
  cosine = optimizers.learning_rate_schedule("cosine", 1.0, warmup_steps=10, total_steps=110,
                                             final_fraction=0.1)
  assert float(cosine(10)) == pytest.approx(1.0)
  assert float(cosine(60)) == pytest.approx(0.55)
  assert float(cosine(110)) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="total_steps"):
    optimizers.learning_rate_schedule("cosine", 1.0)
  with pytest.raises(ValueError, match="name='lion'"):
    optimizers.create_optimizer("lion")


def test_gin_flags_are_rewritten_as_t5x_does_with_bare_strings_quoted():
  argv = ["prog", "--gin.MODEL_DIR=/tmp/run", "--gin.TRAIN_STEPS=10",
          "--gin.MODEL=@omni_smola.model.PaliModel()", "--gin.NAME='already'", "--other=1"]
  assert launching.rewrite_gin_args(argv) == [
      "prog", "--gin_bindings=MODEL_DIR = '/tmp/run'", "--gin_bindings=TRAIN_STEPS = 10",
      "--gin_bindings=MODEL = @omni_smola.model.PaliModel()",
      "--gin_bindings=NAME = 'already'", "--other=1"]
  with pytest.raises(launching.GinConfigError, match="NAME=VALUE"):
    launching.rewrite_gin_args(["--gin.TRAIN_STEPS"])


def _toy_state(value=1.0):
  return {"step": jnp.int32(3), "params": jax.tree_util.tree_map(lambda x: x * value, PARAMS),
          "opt_state": {"count": jnp.int32(3)}}


def test_checkpoints_are_kept_n_resumed_from_the_latest_and_hold_the_data_position(tmp_path):
  config = checkpointing.CheckpointConfig(period=2, keep=2, use_async=True)
  checkpointer = checkpointing.RunCheckpointer(str(tmp_path), config)
  assert checkpointer.latest_step() is None and not os.listdir(tmp_path)
  for step in (2, 4, 6):
    checkpointer.save(step, _toy_state(step), {"batches_consumed": step},
                      params=_toy_state(step)["params"])
  checkpointer.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]
  assert sorted(os.listdir(tmp_path / "adapters")) == ["4", "6"]
  reopened = checkpointing.RunCheckpointer(str(tmp_path), config)
  assert reopened.latest_step() == 6
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    _toy_state())
  state, position = reopened.restore(6, abstract)
  assert position == {"batches_consumed": 6}
  np.testing.assert_array_equal(state["params"]["layer"]["kernel"], 6 * np.ones((4, 3)))
  assert checkpointing.resolve_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoints" / "6")
  assert [s for s, _ in checkpointing.all_checkpoints(str(tmp_path))] == [4, 6]


def test_restoring_into_another_shape_names_the_parameter_and_both_shapes(tmp_path):
  checkpointer = checkpointing.RunCheckpointer(str(tmp_path))
  checkpointer.save(1, _toy_state(), {"batches_consumed": 1})
  checkpointer.close()
  other = _toy_state()
  other["params"]["layer"]["kernel"] = jnp.ones((5, 3))
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), other)
  with pytest.raises(CheckpointMismatchError, match=r"layer/kernel: checkpoint \(4, 3\) vs "
                     r"model \(5, 3\)"):
    checkpointing.RunCheckpointer(str(tmp_path)).restore(1, abstract)
  with pytest.raises(CheckpointMismatchError, match=r"layer/kernel: checkpoint \(4, 3\) vs "
                     r"model \(5, 3\)"):
    checkpointing.restore_params(str(tmp_path), other["params"])
  with pytest.raises(FileNotFoundError, match="does not exist: /no/such/checkpoint"):
    checkpointing.restore_params("/no/such/checkpoint", other["params"])


EXPERIMENTS = {
    "experiments/mini_pretrain.gin": {"MODEL_DIR": "/tmp/x"},
    "experiments/mini_generalist.gin": {"MODEL_DIR": "/tmp/x", "INITIAL_CHECKPOINT_PATH": "/b"},
    "experiments/mini_generalist_lora.gin": {"MODEL_DIR": "/tmp/x",
                                             "INITIAL_CHECKPOINT_PATH": "/b"},
    "experiments/pali3_generalist.gin": {"MODEL_DIR": "/tmp/x", "INITIAL_CHECKPOINT_PATH": "/b"},
    "experiments/mini_specialist.gin": {"MODEL_DIR": "/tmp/x", "INITIAL_CHECKPOINT_PATH": "/g"},
    "experiments/mini_eval.gin": {"CHECKPOINT_PATH": "/c", "EVAL_OUTPUT_DIR": "/e"},
    "experiments/mini_infer.gin": {"CHECKPOINT_PATH": "/c"},
}


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_every_experiment_config_parses_with_its_required_macros(experiment):
  import gin  # pylint: disable=g-import-not-at-top
  # The eval and infer configurables are registered by importing their binaries.
  import omni_smola.eval  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import omni_smola.infer  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  gin.clear_config()
  try:
    launching.parse_gin([experiment], [f"{k} = {v!r}" for k, v in
                                       EXPERIMENTS[experiment].items()])
  finally:
    gin.clear_config()


@pytest.mark.parametrize("adapter", ["omni_smola", "smola_mm", "lora", "mixlora", "mole", "full"])
def test_switching_the_adapter_family_is_one_include(adapter):
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    launching.parse_gin(["models/tiny.gin", f"adapters/{adapter}.gin", "runs/generalist.gin"],
                        ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'mini_generalist'",
                         "TRAIN_STEPS = 1"])
    plan = gin.query_parameter("omni_smola.model.PaliModel.adapters").scoped_configurable_fn()
    spec = plan.adapter
    assert spec.kind == ("smola" if adapter == "smola_mm" else adapter)
    assert gin.query_parameter("TRAINABLE_MODE/macro.value") == (
        "full" if adapter == "full" else "adapters")
  finally:
    gin.clear_config()


def test_specialist_runs_train_only_the_specialist_lora():
  import gin  # pylint: disable=g-import-not-at-top
  from omni_smola.training import trainer  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    launching.parse_gin(
        ["models/tiny.gin", "adapters/omni_smola.gin", "runs/specialist.gin"],
        ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'mini_shapes_count'",
         "TRAIN_STEPS = 1", "INITIAL_CHECKPOINT_PATH = '/generalist'",
         "TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 8}"])
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    optimizer = gin.query_parameter("train.optimizer").scoped_configurable_fn()
    overrides = gin.query_parameter("omni_smola.training.trainer.train.trainable_overrides")
    cfg = gin.query_parameter("train.train_dataset_cfg").scoped_configurable_fn()
    layout = trainer.plan_layout(model, _one_device(), optimizer.tx,
                                 trainer.input_shapes(model, cfg), "adapters", overrides)
  finally:
    gin.clear_config()
  trainable, frozen = split_params(layout.abstract_params, layout.mask)
  paths = lambda tree: ["/".join(str(k.key) for k in path)
                        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert paths(trainable) and all("/specialist_adapter/" in p for p in paths(trainable))
  assert any("/adapter/" in p for p in paths(frozen))  # the generalist's experts stay frozen
  assert not any("specialist" in p for p in paths(frozen))


def test_the_sigterm_handler_only_sets_a_flag_and_the_step_loop_reports_it(monkeypatch):
  # A signal handler runs between any two bytecodes, also in the middle of a write to the
  # run's log file; a handler that logged there crashed the train binary mid-write.
  import signal  # pylint: disable=g-import-not-at-top
  from omni_smola.training import faults  # pylint: disable=g-import-not-at-top
  logged = []
  monkeypatch.setattr(faults.logging, "warning", lambda *args: logged.append(args))
  with faults.PreemptionWatcher() as watcher:
    assert not watcher.reached(3)
    os.kill(os.getpid(), signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a bytecode boundary: the handler has run
    assert logged == []
    assert watcher.reached(4) and watcher.reached(5)
  assert len(logged) == 1 and logged[0][1] == 4
  assert signal.getsignal(signal.SIGTERM) is not watcher._on_sigterm  # pylint: disable=protected-access
