"""The memory plan's per-device total against the memory a real CPU train step uses.

One JSON line: the plan (`omni_smola.memory_plan.plan_train_step`, abstract inputs) and
a measurement of the same step run for real on one CPU device, with their ratio.

What is measured: the step's inputs are allocated (parameters, optimizer state, a
batch) and the step is compiled ahead of time; then the kernel's peak-RSS mark is reset
(`/proc/self/clear_refs`, 5) and the step runs, twice. The measured total is the
inputs' bytes (`jax.Array.nbytes`, what stays resident) plus the larger rise of the peak
RSS over the RSS just before a run: the outputs that do not reuse a donated input and
every temporary, as the process really touched them. glibc serves large requests by
mmap from this size up (`MALLOC_MMAP_THRESHOLD_`, set for the child), so a temporary is
fresh pages rather than heap the compiler freed earlier, and the rise counts it. The
first run is the larger: XLA:CPU's runtime keeps its buffers for the next run (the second
run's rise is a few MB) and makes one-time allocations of its own in the first, so the
measurement errs high, by those.

  python benchmarks/memory_plan_vs_measured.py [--batch_size 32] [--length 16]
"""
import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MMAP_THRESHOLD = 1 << 16


def rss_kib():
  status = open("/proc/self/status").read()
  return {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1))
          for key in ("VmRSS", "VmHWM")}


def measure(batch_size: int, length: int):
  sys.path.insert(0, ROOT)
  # pylint: disable=g-import-not-at-top
  import gin
  import jax
  import numpy as np

  from omni_smola import memory_plan, params, partitioning
  from omni_smola.training import optimizers, partitioned_step, trainer
  from omni_smola.training.train_state import TrainState, split_params

  lengths = {"inputs": length, "targets": length}
  params.parse_config(["models/mini.gin", "adapters/omni_smola.gin"],
                      [f"TASK_FEATURE_LENGTHS = {lengths!r}"])
  model, _, mode = params.run_macros()
  partitioner = partitioned_step.Partitioner(
      mesh=partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1]))
  optimizer = optimizers.create_optimizer()
  plan = memory_plan.plan_train_step(model, partitioner, optimizer, lengths, batch_size,
                                     trainable_mode=mode)

  # The same step for real, as the trainer sets it up.
  tx = optimizer.tx
  shapes = trainer.input_shapes(model, memory_plan.lengths_only_dataset(lengths))
  layout = trainer.plan_layout(model, partitioner, tx, shapes, mode, ())
  variables = partitioned_step.init_params(partitioner, model, jax.random.PRNGKey(0), shapes,
                                           layout.params_sharding)
  trainable, frozen = split_params(variables, layout.mask)
  state = TrainState(step=partitioned_step.replicate(partitioner, np.int32(0)),
                     trainable=trainable,
                     opt_state=partitioned_step.init_opt_state(partitioner, tx, trainable,
                                                               layout.opt_sharding))
  rng = np.random.default_rng(0)
  batch = {}
  for name, spec in memory_plan.abstract_batch(model, lengths, batch_size).items():
    values = (rng.normal(size=spec.shape) if name == "image" else
              rng.integers(1, 100, size=spec.shape))
    batch[name] = values.astype(spec.dtype)
  batch = partitioner.global_batch(batch, batch_size)
  key = partitioned_step.replicate(partitioner, jax.random.PRNGKey(1))
  step = partitioned_step.jit_train_step(
      partitioner, partitioned_step.make_train_step(model, tx, optimizer.learning_rate),
      layout.state_sharding, layout.frozen_sharding, partitioner.batch_sharding(batch))
  with partitioner.context():
    compiled = step.jitted.lower(state, frozen, batch, key).compile()
  inputs = sum(x.nbytes for x in jax.tree_util.tree_leaves((state, frozen, batch, key)))
  rises = []
  for _ in range(2):
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    before = rss_kib()["VmRSS"]
    state, metrics = compiled(state, frozen, batch, key)
    jax.block_until_ready((state, metrics))
    rises.append((rss_kib()["VmHWM"] - before) * 1024)
    del metrics
  rise = max(rises)
  gin.clear_config()
  xla = plan["xla_bytes"]
  return {
      "config": "mini", "adapter": "omni_smola", "batch_size": batch_size,
      "task_feature_lengths": lengths,
      "plan_total_bytes": plan["total_bytes"], "measured_total_bytes": inputs + rise,
      "plan_vs_measured": round(plan["total_bytes"] / (inputs + rise), 3),
      "plan_input_bytes": plan["input_bytes"], "measured_input_bytes": inputs,
      "plan_step_bytes": xla["output"] - xla["alias"] + xla["temp"],
      "measured_step_bytes": rise, "measured_rise_by_run": rises,
      "device": jax.devices()[0].platform,
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--length", type=int, default=16, help="inputs and targets tokens")
  parser.add_argument("--child", action="store_true", help="measure in this process")
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.batch_size, args.length)), flush=True)
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu", MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
  child = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                          "--batch_size", str(args.batch_size), "--length", str(args.length)],
                         env=env, capture_output=True, text=True, check=False)
  if child.returncode:
    raise SystemExit(child.stderr[-3000:])
  print(child.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
  main()
