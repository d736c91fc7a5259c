"""Seconds to build, trace, lower and compile one train step: scanned vs unrolled layers.

One JSON object per line, per (config, layout):
  config, adapter, scan_layers
  eval_shape_seconds   `jax.eval_shape` of the model's initialisation (abstract parameters)
  lower_seconds        tracing and lowering the real train step (`partitioned_step`) on
                       abstract, sharded inputs: no parameter is ever allocated
  compile_seconds      XLA's compile of that lowered step
  total_seconds        the three together: what a (re)start pays before its first step
and, once both layouts of a config are measured, a line with `scanned_vs_unrolled`: the
unrolled total over the scanned total (target for pali3 + Omni-SMoLA-48: >= 5).

Each layout runs in a fresh process (no tracing or compilation cache shared between them),
on one CPU device. The train step is the trainer's own: Adafactor, the adapters trainable,
the backbone frozen, `TASK_FEATURE_LENGTHS` 64/64 and batch 8 by default.

  python benchmarks/compile_time.py [--config pali3] [--experts 48] [--batch_size 8]
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(config_name: str, experts: int, scan: bool, batch_size: int, lengths):
  """The timings of one layout, in this process."""
  sys.path.insert(0, ROOT)
  # pylint: disable=g-import-not-at-top
  import dataclasses

  import jax
  import numpy as np

  from omni_smola.model import PaliModel
  from omni_smola.models import configs
  from omni_smola.nn import AdapterSpec
  from omni_smola.training import optimizers, partitioned_step, trainer
  from omni_smola.training.data_iterator import DatasetConfig
  from omni_smola.training.train_state import TrainState, split_params

  named = configs.CONFIGS[config_name]
  config = dataclasses.replace(named, text=dataclasses.replace(named.text, scan_layers=scan))
  if named.vision is not None:
    config = dataclasses.replace(config, vision=dataclasses.replace(named.vision,
                                                                    scan_layers=scan))
  spec = AdapterSpec(kind="omni_smola", rank=4,
                     experts_per_group={"mm": experts, "vis": experts, "txt": experts})
  model = PaliModel(config, spec)
  partitioner = partitioned_step.Partitioner(
      mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model")))
  optimizer = optimizers.create_optimizer(learning_rate=1e-3)
  cfg = DatasetConfig("unused", lengths, batch_size=batch_size)

  start = time.perf_counter()
  layout = trainer.plan_layout(model, partitioner, optimizer.tx,
                               trainer.input_shapes(model, cfg), "adapters", ())
  eval_shape_seconds = time.perf_counter() - start

  params = partitioned_step.with_sharding(layout.abstract_params, layout.params_sharding)
  trainable, frozen = split_params(params, layout.mask)
  opt_state = partitioned_step.with_sharding(jax.eval_shape(optimizer.tx.init, trainable),
                                             layout.opt_sharding)
  step_shape = jax.ShapeDtypeStruct((), np.int32, sharding=layout.state_sharding.step)
  state = TrainState(step=step_shape, trainable=trainable, opt_state=opt_state)
  shapes = trainer.input_shapes(model, cfg, batch_size)
  batch = {name: jax.ShapeDtypeStruct(shape, np.float32 if name == "image" else np.int32)
           for name, shape in shapes.items()}
  targets = shapes["decoder_input_tokens"]
  batch["decoder_target_tokens"] = jax.ShapeDtypeStruct(targets, np.int32)
  batch["decoder_loss_weights"] = jax.ShapeDtypeStruct(targets, np.float32)
  batch_sharding = partitioner.batch_sharding(batch)
  batch = partitioned_step.with_sharding(batch, batch_sharding)
  rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=partitioner.replicated())
  step = partitioned_step.jit_train_step(
      partitioner, partitioned_step.make_train_step(model, optimizer.tx,
                                                    optimizer.learning_rate),
      layout.state_sharding, layout.frozen_sharding, batch_sharding)
  with partitioner.context():
    start = time.perf_counter()
    lowered = step.jitted.lower(state, frozen, batch, rng)
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compile_seconds = time.perf_counter() - start
  return {
      "config": config_name, "adapter": f"omni_smola_{experts}", "scan_layers": scan,
      "eval_shape_seconds": round(eval_shape_seconds, 2),
      "lower_seconds": round(lower_seconds, 2), "compile_seconds": round(compile_seconds, 2),
      "total_seconds": round(eval_shape_seconds + lower_seconds + compile_seconds, 2),
      "batch_size": batch_size, "task_feature_lengths": lengths,
      "device": jax.devices()[0].platform,
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="pali3")
  parser.add_argument("--experts", type=int, default=48)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--length", type=int, default=64, help="inputs and targets tokens")
  parser.add_argument("--layout", choices=("scanned", "unrolled"), default=None,
                      help="measure one layout in this process (the driver's child mode)")
  args = parser.parse_args()
  lengths = {"inputs": args.length, "targets": args.length}
  if args.layout is not None:
    print(json.dumps(measure(args.config, args.experts, args.layout == "scanned",
                             args.batch_size, lengths)), flush=True)
    return
  totals = {}
  for layout in ("scanned", "unrolled"):
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--config", args.config,
         "--experts", str(args.experts), "--batch_size", str(args.batch_size),
         "--length", str(args.length), "--layout", layout],
        capture_output=True, text=True, check=True,
        env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
    line = child.stdout.strip().splitlines()[-1]
    print(line, flush=True)
    totals[layout] = json.loads(line)
  print(json.dumps({
      "config": args.config, "adapter": f"omni_smola_{args.experts}",
      "scanned_vs_unrolled": {
          key: round(totals["unrolled"][key] / totals["scanned"][key], 2)
          for key in ("eval_shape_seconds", "lower_seconds", "compile_seconds",
                      "total_seconds")},
      "device": totals["scanned"]["device"]}), flush=True)


if __name__ == "__main__":
  main()
