"""Jitted train / predict / score steps with explicit shardings over a device mesh.

`Partitioner` holds the mesh and the logical axis rules (from
`omni_smola.partitioning`) and turns logical names into `NamedSharding`s:
parameters by the axes they were created with, batches along `batch` (the
`data` mesh axis), metrics replicated. Host-local batches become global arrays
with `jax.make_array_from_process_local_data`, so the same code runs on one CPU,
one TPU host or a multi-host pod.

Every step is `jax.jit` with `in_shardings` / `out_shardings` and runs inside the
mesh and the rules, so the model's own `with_logical_constraint`s apply. Within
`program_cache.shared_programs()` (a study, the demo) runs with equal models,
optimizers and shardings share each program instead of tracing it again.
"""
import contextlib
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from flax import traverse_util
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from omni_smola import param_layout
from omni_smola import partitioning
from omni_smola.training import microbatches, program_cache
from omni_smola.training.train_state import Params, TrainState, merge_params

NONFINITE_POLICIES = ("stop", "skip")


@gin.configurable
class Partitioner:
  """A mesh (`partitioning.create_mesh`, gin-configured) and the logical rules."""

  def __init__(self, mesh: Optional[jax.sharding.Mesh] = None,
               rules: Optional[partitioning.LogicalRules] = None):
    self.mesh = mesh if mesh is not None else partitioning.create_mesh()
    rules = rules if rules is not None else partitioning.logical_axis_rules()
    self.rules = partitioning.rules_for_mesh(self.mesh, rules)

  @property
  def data_parallel_size(self) -> int:
    return int(self.mesh.shape["data"])

  @property
  def key(self) -> Tuple[Any, ...]:
    """What every program built under this partitioner depends on: the mesh, the rules."""
    return self.mesh, tuple(tuple(rule) for rule in self.rules)

  @contextlib.contextmanager
  def context(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def variables_sharding(self, abstract_boxed):
    """Shardings for a boxed variable tree from `jax.eval_shape(model init)`."""
    return partitioning.variables_sharding(abstract_boxed, self.mesh, self.rules)

  def batch_sharding(self, batch_spec: Mapping[str, Any]) -> Dict[str, NamedSharding]:
    """Each feature split along its leading (batch) axis over `data`."""
    batch_axis = partitioning.logical_to_sharding(PartitionSpec("batch"), self.mesh,
                                                  self.rules).spec[0]
    return {k: NamedSharding(self.mesh, PartitionSpec(batch_axis)) for k in batch_spec}

  def global_batch(self, local_batch: Mapping[str, np.ndarray],
                   global_batch_size: int) -> Dict[str, jax.Array]:
    """This process's rows -> global arrays of `global_batch_size` rows."""
    shardings = self.batch_sharding(local_batch)
    return {
        k: jax.make_array_from_process_local_data(
            shardings[k], np.asarray(v), (global_batch_size,) + tuple(np.shape(v)[1:]))
        for k, v in local_batch.items()
    }

  def opt_state_sharding(self, tx: optax.GradientTransformation, abstract_trainable,
                         trainable_sharding, tx_spec: Optional[str] = None):
    """Shardings of `tx.init(trainable)` as the compiler lays them out.

    Optimizer states need not be shaped like parameters (Adafactor keeps factored
    row and column statistics), so their layout comes from compiling the init.
    `tx_spec`: the `Optimizer.spec` of `tx` (None: never shared).
    """
    def build():
      with self.context():
        compiled = jax.jit(tx.init, in_shardings=(trainable_sharding,)).lower(
            abstract_trainable).compile()
      return compiled.output_shardings

    return program_cache.get_or_build(
        ("opt_state_sharding", self.key, tx_spec, program_cache.tree_key(abstract_trainable),
         program_cache.tree_key(trainable_sharding)), build)


def train_state_sharding(partitioner: Partitioner, trainable_sharding, opt_sharding):
  return TrainState(step=partitioner.replicated(), trainable=trainable_sharding,
                    opt_state=opt_sharding)


def make_train_step(model, tx: optax.GradientTransformation,
                    learning_rate: Callable[[jnp.ndarray], jnp.ndarray],
                    on_nonfinite: str = "stop", num_microbatches: int = 1) -> Callable:
  """`step(state, frozen, batch, rng) -> (state, metrics)`; metrics are sums.

  Gradients are taken with respect to `state.trainable` only; `frozen` is closed
  over by the loss, never differentiated. With `on_nonfinite='skip'` a step whose
  loss or gradient is not finite leaves parameters and optimizer state unchanged
  (the step counter still advances, so the data position stays consistent).
  `num_microbatches` > 1 accumulates the gradient over that many slices of the
  batch (`microbatches.accumulated_gradients`): the full batch's update in a
  microbatch's activation memory.
  """
  if on_nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"on_nonfinite={on_nonfinite!r} is not one of {NONFINITE_POLICIES}")
  factor = microbatches.loss_normalizing_factor(model, num_microbatches)

  def train_step(state: TrainState, frozen: Params, batch, rng):
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_of(trainable):
      return model.loss_fn(merge_params(trainable, frozen), batch, dropout_rng)

    if num_microbatches == 1:
      (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.trainable)
    else:
      loss, metrics, grads = microbatches.accumulated_gradients(
          model, factor, state.trainable, frozen, batch, dropout_rng, num_microbatches)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if on_nonfinite == "skip":
      keep = lambda new, old: jnp.where(finite, new, old)
      trainable = jax.tree_util.tree_map(keep, trainable, state.trainable)
      opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
    metrics = dict(metrics)
    metrics.update(
        step_loss=loss, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32),
        learning_rate=jnp.asarray(learning_rate(state.step), jnp.float32))
    new_state = TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, metrics

  return train_step


def train_step_key(model, optimizer, on_nonfinite: str = "stop",
                   num_microbatches: int = 1) -> Tuple[Any, ...]:
  """What `make_train_step`'s step computes, as a `program_cache` key part."""
  return ("train_step", model.fingerprint, optimizer.spec, on_nonfinite, num_microbatches)


def jit_train_step(partitioner: Partitioner, train_step: Callable, state_sharding,
                   frozen_sharding, batch_sharding, key: Optional[Tuple[Any, ...]] = None):
  """The train step, jitted with shardings; the state is donated (updated in place).

  `key` (`train_step_key`): steps with equal keys share one program within
  `program_cache.shared_programs()`; None builds a program of its own.
  """
  replicated = partitioner.replicated()
  jitted = program_cache.jit(
      _under(partitioner, key), train_step,
      in_shardings=(state_sharding, frozen_sharding, batch_sharding, replicated),
      out_shardings=(state_sharding, replicated), donate_argnums=(0,))

  @functools.wraps(train_step)
  def run(*args):
    with partitioner.context():
      return jitted(*args)

  run.jitted = jitted
  return run


def jit_params_fn(partitioner: Partitioner, fn: Callable, params_sharding,
                  batch_sharding, key: Optional[Tuple[Any, ...]] = None) -> Callable:
  """`fn(params, batch)` jitted with sharded inputs and replicated outputs (`key`: what
  `fn` computes, to share it within `program_cache.shared_programs()`)."""
  jitted = program_cache.jit(
      _under(partitioner, key), fn,
      in_shardings=(params_sharding, batch_sharding), out_shardings=partitioner.replicated())

  def run(params, batch):
    with partitioner.context():
      return jitted(params, batch)

  return run


def init_params(partitioner: Partitioner, model, rng, input_shapes, params_sharding,
                keep: Optional[Callable[[Tuple[str, ...]], bool]] = None,
                keep_key: Optional[Tuple[Any, ...]] = None):
  """Fresh parameters (unboxed), initialised directly in their sharded layout.

  `keep(path)`: only the parameters it accepts (e.g. the adapters a pretrained backbone
  lacks). XLA then drops the others' initialisation from the program, so neither their
  memory nor their random-number work is spent. `keep_key`: what `keep` decides, as a
  value; without it a `keep` makes the init a program of its own.
  """
  def subtree(tree):
    if keep is None:
      return tree
    flat = traverse_util.flatten_dict(dict(tree))
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if keep(k)})

  def init(rng):
    variables = model.get_initial_variables(rng, input_shapes)
    return subtree(param_layout.unbox(variables["params"]))

  # Outside the rules: `out_shardings` lays the parameters out, so no constraint is
  # needed inside the init.
  key = ("init_params", model.fingerprint, _shapes_key(input_shapes),
         "all" if keep is None else keep_key)
  jitted = program_cache.jit(_under(partitioner, key), init,
                             out_shardings=subtree(params_sharding))
  with jax.set_mesh(partitioner.mesh):
    return jitted(rng)


def _under(partitioner: Partitioner, key: Optional[Tuple[Any, ...]]):
  """A program's `program_cache` key under `partitioner` (None stays None: not shared)."""
  return None if key is None else (partitioner.key,) + tuple(key)


def _shapes_key(input_shapes) -> Tuple[Any, ...]:
  return tuple(sorted((name, tuple(shape)) for name, shape in input_shapes.items()))


def abstract_variables(model, input_shapes) -> Dict[str, Any]:
  """Boxed `ShapeDtypeStruct` variables: shapes and logical axes, no memory."""
  return program_cache.get_or_build(
      ("abstract_variables", model.fingerprint, _shapes_key(input_shapes)),
      lambda: jax.eval_shape(lambda rng: model.get_initial_variables(rng, input_shapes),
                             jax.random.PRNGKey(0)))


def with_sharding(abstract_tree, sharding_tree):
  """`ShapeDtypeStruct`s carrying shardings (targets for restore and lowering)."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_tree, sharding_tree)


def init_opt_state(partitioner: Partitioner, tx, trainable, opt_sharding,
                   tx_spec: Optional[str] = None):
  """`tx.init(trainable)` in its layout (`tx_spec`: the `Optimizer.spec`, to share it)."""
  jitted = program_cache.jit(("init_opt_state", partitioner.key, tx_spec), tx.init,
                             out_shardings=opt_sharding)
  with partitioner.context():
    return jitted(trainable)


def replicate(partitioner: Partitioner, value) -> jax.Array:
  """`value` on every device (from host memory, so it works with several processes)."""
  return jax.device_put(np.asarray(value), partitioner.replicated())

