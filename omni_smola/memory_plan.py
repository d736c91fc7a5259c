"""A run's per-device memory and compile time, from the real train step, before launch.

`plan_train_step` lowers and compiles the trainer's own jitted step
(`partitioned_step.make_train_step` + `jit_train_step`, with the trainer's in/out
shardings and donation) on `jax.ShapeDtypeStruct` inputs that carry shardings: the
state and parameters come from `jax.eval_shape`, so nothing is allocated.

Per device it reports
  parameters (trainable, frozen) and optimizer state: each array's shard shape
      (`sharding.shard_shape`) times its item size, so a replicated array counts in
      full on every device and a sharded one by its shard;
  the batch and the dropout key, the same way;
  XLA's `compiled.memory_analysis()`: arguments, outputs, the outputs that alias a
      donated argument (the train state is updated in place) and temporaries
      (activations, gradients, optimizer update, collectives' buffers).
The total a device needs is its inputs (by the shardings: XLA's arguments leave out
inputs the step never reads, which still occupy the device) + outputs - aliased +
temporaries + generated code; the step fits when that is at most the device's memory.

The devices are simulated CPU devices (`use_simulated_devices`): the program is
partitioned exactly as on a TPU mesh of that shape, but XLA:CPU plans its buffers,
so temporaries are an estimate of a TPU's (docs/DESIGN.md, 6.3).
"""
import re
import time
from typing import Any, Dict, Mapping, Sequence, Tuple

import jax
import numpy as np

from omni_smola.data.feature_converter import PaliFeatureConverter
from omni_smola.training import data_iterator, microbatches, optimizers, partitioned_step
from omni_smola.training import trainer
from omni_smola.training.train_state import TrainState, split_params

BYTE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_bytes(text: str) -> int:
  """'32GiB', '16 GB', '1.5TiB', '4096' (bytes) -> a number of bytes."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
  if not match or (match.group(2) or "B") not in BYTE_UNITS:
    raise ValueError(f"{text!r} is not a number of bytes with a unit of "
                     f"{', '.join(BYTE_UNITS)} (e.g. 32GiB)")
  return int(float(match.group(1)) * BYTE_UNITS[match.group(2) or "B"])


def use_simulated_devices(num_devices: int) -> None:
  """`num_devices` CPU devices for this process: call before anything starts JAX.

  `jax_num_cpu_devices` is the config form of XLA_FLAGS'
  --xla_force_host_platform_device_count; both only act before JAX's backends start
  (the first `jax.devices()`, array or log line naming the process). A process whose
  backends already run keeps its devices: enough CPU devices are used as they are.
  """
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", num_devices)
  except RuntimeError:
    have = len(jax.devices("cpu"))
    if have < num_devices:
      raise ValueError(f"the mesh needs {num_devices} simulated CPU devices, but JAX "
                       f"already started with {have}: plan in a fresh process") from None


def check_batch(batch_size: int, num_microbatches: int, data_parallel_size: int,
                num_hosts: int = 1) -> None:
  """The trainer's batch checks (BATCH_SIZE over hosts and `data`, NUM_MICROBATCHES)."""
  if batch_size % num_hosts:
    raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by the {num_hosts} hosts")
  microbatches.check_num_microbatches(num_microbatches, batch_size, num_hosts, "host")
  data_iterator.check_batch_size(batch_size, data_parallel_size)
  microbatches.check_num_microbatches(num_microbatches, batch_size, data_parallel_size,
                                      "device")


def abstract_batch(model, task_feature_lengths: Mapping[str, int], batch_size: int
                   ) -> Dict[str, jax.ShapeDtypeStruct]:
  """The train batch the data pipeline yields (`PaliFeatureConverter`), as shapes."""
  converter = PaliFeatureConverter(image_size=trainer.image_size_of(model),
                                   pix2struct_patching=model.config.pix2struct_patching)
  shapes = converter.model_feature_shapes(task_feature_lengths)
  return {name: jax.ShapeDtypeStruct((batch_size,) + shapes[name], spec.dtype.as_numpy_dtype)
          for name, spec in converter.MODEL_FEATURES.items()}


def tree_bytes(tree, per_device: bool = True) -> int:
  """Bytes of a tree of sharded `ShapeDtypeStruct`s: one device's shards, or whole."""
  def nbytes(leaf):
    shape = leaf.sharding.shard_shape(leaf.shape) if per_device else leaf.shape
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return sum(nbytes(leaf) for leaf in jax.tree_util.tree_leaves(tree))


def plan_train_step(model, partitioner: partitioned_step.Partitioner,
                    optimizer: optimizers.Optimizer, task_feature_lengths: Mapping[str, int],
                    batch_size: int, num_microbatches: int = 1,
                    trainable_mode: str = "adapters",
                    trainable_overrides: Sequence[Tuple[str, bool]] = (),
                    on_nonfinite: str = "stop") -> Dict[str, Any]:
  """Lowers and compiles the trainer's step on abstract sharded inputs; bytes per device."""
  data_parallel = partitioner.data_parallel_size
  check_batch(batch_size, num_microbatches, data_parallel)
  tx = optimizer.tx
  start, cpu_start = time.perf_counter(), time.process_time()
  shapes = trainer.input_shapes(model, lengths_only_dataset(task_feature_lengths))
  layout = trainer.plan_layout(model, partitioner, tx, shapes, trainable_mode,
                               trainable_overrides)
  abstract = trainer._abstract_checkpoint(layout, tx)  # pylint: disable=protected-access
  trainable, frozen = split_params(abstract["params"], layout.mask)
  state = TrainState(step=abstract["step"], trainable=trainable,
                     opt_state=abstract["opt_state"])
  batch = abstract_batch(model, task_feature_lengths, batch_size)
  batch_sharding = partitioner.batch_sharding(batch)
  batch = partitioned_step.with_sharding(batch, batch_sharding)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=partitioner.replicated())
  step = partitioned_step.jit_train_step(
      partitioner, partitioned_step.make_train_step(model, tx, optimizer.learning_rate,
                                                    on_nonfinite, num_microbatches),
      layout.state_sharding, layout.frozen_sharding, batch_sharding)
  with partitioner.context():
    lowered = step.jitted.lower(state, frozen, batch, rng)
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start
  cpu_seconds = time.process_time() - cpu_start
  xla = compiled.memory_analysis()
  xla_bytes = {name: int(getattr(xla, f"{name}_size_in_bytes"))
               for name in ("argument", "output", "alias", "temp", "generated_code")}
  inputs = {"trainable_parameters": trainable, "frozen_parameters": frozen,
            "optimizer_state": abstract["opt_state"], "step_and_rng": (abstract["step"], rng),
            "batch": batch}
  per_device = {name: tree_bytes(tree) for name, tree in inputs.items()}
  # jit leaves out the inputs the step never reads (Adafactor's 1-element placeholders,
  # `task_id`): XLA's arguments omit them, but the state keeps them on the device.
  input_bytes = sum(per_device.values())
  total = (input_bytes + xla_bytes["output"] - xla_bytes["alias"] + xla_bytes["temp"]
           + xla_bytes["generated_code"])
  return {
      "mesh": {name: int(size) for name, size in partitioner.mesh.shape.items()},
      "num_devices": int(partitioner.mesh.size),
      "batch_size": batch_size, "num_microbatches": num_microbatches,
      "task_feature_lengths": dict(task_feature_lengths),
      "trainable_mode": trainable_mode,
      "per_device_bytes": per_device, "input_bytes": input_bytes, "xla_bytes": xla_bytes,
      "global_bytes": {name: tree_bytes(tree, per_device=False)
                       for name, tree in inputs.items()},
      "total_bytes": total,
      "trace_and_lower_seconds": round(lower_seconds, 2),
      "compile_seconds": round(compile_seconds, 2),
      # The process's CPU time for all of it: a measure that a busy machine does not stretch.
      "cpu_seconds": round(cpu_seconds, 2),
      "backend": partitioner.mesh.devices.flat[0].platform,
  }


def lengths_only_dataset(task_feature_lengths) -> data_iterator.DatasetConfig:
  """Only the lengths matter to `trainer.input_shapes` (parameters ignore the batch)."""
  return data_iterator.DatasetConfig("unused", dict(task_feature_lengths), batch_size=1)


def with_verdict(plan: Mapping[str, Any], device_memory: int) -> Dict[str, Any]:
  """`plan` with the device memory it was judged against and whether the step fits."""
  return dict(plan, device_memory_bytes=device_memory,
              fits=plan["total_bytes"] <= device_memory)
