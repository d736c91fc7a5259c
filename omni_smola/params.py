r"""Counts a configured model's parameters, optimizer state and FLOPs, allocating nothing.

    python -m omni_smola.params --gin_file=models/pali3.gin \
      --gin_file=adapters/omni_smola.gin --output=/tmp/pali3_accounting.json

Takes the train binary's flags (`--gin_file`, `--gin.NAME=VALUE`,
`--gin_search_paths`): pass the same gin files as the run (a whole experiment file
works too). It reads `MODEL`, `TASK_FEATURE_LENGTHS` (default {'inputs': 32,
'targets': 32}), `TRAINABLE_MODE` (default 'adapters'), the trainer's
`trainable_overrides` and `create_optimizer.name` when the config binds them, prints
a table (see `omni_smola.accounting` for what is counted and the token assumptions)
and, with `--output`, writes the full account as JSON.

With `--plan` it instead lowers and compiles the run's real train step for a mesh of
simulated CPU devices and prints the bytes each device needs (`omni_smola.memory_plan`):

    python -m omni_smola.params --gin_file=experiments/pali3_generalist.gin \
      --plan --mesh=data:4,model:4 --device_memory=32GiB

`--mesh` names the axes' sizes (data may be -1 with `--num_devices`), BATCH_SIZE and
NUM_MICROBATCHES come from the config (defaults 32 and 1). The flags are checked before
anything runs, and the process gives itself the mesh's devices before JAX starts
(`memory_plan.use_simulated_devices`), so no XLA_FLAGS are needed.
"""
if __name__ == "__main__":
  from omni_smola import console  # pylint: disable=g-import-not-at-top
  console.hold_native_stderr()  # before TensorFlow loads and prints its start-up lines

import dataclasses
import os
import re
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from absl import flags
import gin
import jax
import numpy as np

from omni_smola import accounting
from omni_smola import console
from omni_smola import launching
from omni_smola import memory_plan
from omni_smola import param_layout
from omni_smola import partitioning
from omni_smola.evaluation import evaluator
from omni_smola.training import optimizers, partitioned_step

flags.DEFINE_string("output", None, "Write the accounting (or the plan) as JSON to this path.")
flags.DEFINE_bool("plan", False, "Compile the train step on simulated devices and print the "
                  "memory each device needs instead of the accounting.")
flags.DEFINE_string("mesh", None, "--plan's mesh: data:D,model:M[,expert:E].")
flags.DEFINE_integer("num_devices", None, "--plan's device count (default: the mesh's "
                     "product; needed when data is -1).")
flags.DEFINE_string("device_memory", None, "--plan: one device's memory, e.g. 32GiB.")

FLAGS = flags.FLAGS

# Parsed before the user's files, so these are defaults a config or flag overrides, and
# the macros count as used (`--gin.TASK_FEATURE_LENGTHS=...` is then always accepted).
DEFAULTS = f"""
TASK_FEATURE_LENGTHS = {accounting.DEFAULT_TASK_FEATURE_LENGTHS!r}
TRAINABLE_MODE = 'adapters'
omni_smola.params.run_macros.model = %MODEL
omni_smola.params.run_macros.task_feature_lengths = %TASK_FEATURE_LENGTHS
omni_smola.params.run_macros.trainable_mode = %TRAINABLE_MODE
BATCH_SIZE = 32
NUM_MICROBATCHES = 1
omni_smola.params.plan_macros.batch_size = %BATCH_SIZE
omni_smola.params.plan_macros.num_microbatches = %NUM_MICROBATCHES
"""


@gin.configurable(module="omni_smola.params")
def run_macros(model=gin.REQUIRED, task_feature_lengths=None,
               trainable_mode="adapters"):
  """What the accounting needs from the run's macros (bound in DEFAULTS)."""
  return model, task_feature_lengths, trainable_mode


@gin.configurable(module="omni_smola.params")
def plan_macros(batch_size=32, num_microbatches=1):
  """What the memory plan needs besides `run_macros` (bound in DEFAULTS)."""
  return batch_size, num_microbatches


_resolve = launching.evaluated


def _bound(binding_key: str, default):
  """The run's binding of `binding_key`, or `default` when the config has none."""
  try:
    return _resolve(gin.query_parameter(binding_key))
  except ValueError:
    return default


def parse_config(gin_files, gin_bindings, search_paths=(launching.REPO_GIN_CONFIGS,)):
  """Our defaults, then the run's gin files and bindings; fails early without a MODEL."""
  gin.parse_config(DEFAULTS)
  launching.parse_gin(gin_files, gin_bindings, search_paths, finalize=False)
  try:
    gin.query_parameter("%MODEL")
  except ValueError:
    raise launching.GinConfigError(
        "no MODEL is configured: pass a model config, e.g. --gin_file=models/pali3.gin"
    ) from None
  gin.finalize()


def account_from_gin():
  """The account of the model the parsed gin config describes."""
  model, lengths, mode = run_macros()
  overrides = _bound("omni_smola.training.trainer.train.trainable_overrides", ())
  optimizer = _bound("omni_smola.training.optimizers.create_optimizer.name", "adafactor")
  return accounting.account_model(model, lengths, mode, tuple(overrides), optimizer)


@dataclasses.dataclass(frozen=True)
class PlanRequest:
  """--plan's flags, checked: the mesh's axis sizes and one device's memory in bytes."""
  mesh_sizes: Tuple[int, int, int]
  device_memory: int

  @property
  def num_devices(self) -> int:
    return int(np.prod(self.mesh_sizes))


def plan_request(plan: bool, mesh: Optional[str], num_devices: Optional[int],
                 device_memory: Optional[str]) -> Optional[PlanRequest]:
  """The --plan flags checked before anything runs; errors name the flag and its value."""
  if not plan:
    given = [f"--{name}" for name, value in (("mesh", mesh), ("num_devices", num_devices),
                                             ("device_memory", device_memory))
             if value is not None]
    if given:
      raise launching.FlagError(f"{', '.join(given)} only act with --plan")
    return None
  for name, value, example in (("mesh", mesh, "data:4,model:4"),
                               ("device_memory", device_memory, "32GiB")):
    if value is None:
      raise launching.FlagError(f"--plan needs --{name} (e.g. --{name}={example})")
  try:
    sizes = partitioning.parse_mesh_spec(mesh)
  except ValueError as e:
    raise launching.FlagError(f"--mesh={mesh}: {e}") from None
  if num_devices is None:
    if sizes["data"] == -1:
      raise launching.FlagError(f"--mesh={mesh} leaves the data axis to the device count: "
                                "give data:D or --num_devices")
    num_devices = sizes["data"] * sizes["model"] * sizes["expert"]
  try:
    mesh_sizes = partitioning.mesh_axis_sizes(num_devices, **sizes)
  except ValueError as e:
    raise launching.FlagError(f"--mesh={mesh} does not fit --num_devices={num_devices}: "
                              f"{e}") from None
  try:
    memory = memory_plan.parse_bytes(device_memory)
  except ValueError as e:
    raise launching.FlagError(f"--device_memory={device_memory}: {e}") from None
  return PlanRequest(mesh_sizes, memory)


def start_simulated_devices(request: PlanRequest) -> None:
  try:
    memory_plan.use_simulated_devices(request.num_devices)
  except ValueError as e:
    raise launching.FlagError(f"--mesh: {e}") from None


def plan_from_gin(request: PlanRequest, config_label: str = "custom") -> Dict[str, Any]:
  """The memory plan of the parsed gin config's train step on the requested mesh.

  `config_label` names the model when its config is not a named one (the gin files).
  """
  model, lengths, mode = run_macros()
  batch_size, num_microbatches = plan_macros()
  data, model_axis, expert = request.mesh_sizes
  try:
    memory_plan.check_batch(batch_size, num_microbatches, data)
  except ValueError as e:
    raise launching.GinConfigError(str(e)) from None
  mesh = partitioning.create_mesh(data, model_axis, expert,
                                  devices=jax.devices()[:request.num_devices])
  plan = memory_plan.plan_train_step(
      model, partitioned_step.Partitioner(mesh=mesh), optimizers.create_optimizer(),
      lengths, batch_size, num_microbatches, mode,
      tuple(_bound("omni_smola.training.trainer.train.trainable_overrides", ())),
      _bound("omni_smola.training.trainer.train.on_nonfinite_loss", "stop"))
  plan["optimizer"] = _bound("omni_smola.training.optimizers.create_optimizer.name",
                             "adafactor")
  plan["model"] = model.config_name or config_label
  return memory_plan.with_verdict(plan, request.device_memory)


# ------------------------------------------------------------------------- table


def human(n: float, unit: str = "") -> str:
  """1234567 -> '1.23M' (powers of 1000); bytes use powers of 1024 (unit='B')."""
  base, suffixes = (1024.0, ("B", "KiB", "MiB", "GiB", "TiB", "PiB")) if unit == "B" else (
      1000.0, ("", "K", "M", "G", "T", "P"))
  value, index = float(n), 0
  while abs(value) >= base and index < len(suffixes) - 1:
    value /= base
    index += 1
  if index == 0:
    return f"{int(value)}{' B' if unit == 'B' else ''}"
  return f"{value:.3g}{' ' if unit == 'B' else ''}{suffixes[index]}"


def _row(cells, widths):
  return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                   for i, (c, w) in enumerate(zip(cells, widths)))


def _table(header, rows):
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  lines = [_row(header, widths), _row(["-" * w for w in widths], widths)]
  return "\n".join(lines + [_row(r, widths) for r in rows])


def format_table(account: Mapping[str, Any]) -> str:
  """The account as the CLI prints it."""
  model, assumptions = account["model"], account["assumptions"]
  params, flops, optimizer = account["parameters"], account["flops"], account["optimizer"]
  groups = list(params["by_group"])
  tokens = assumptions["tokens"]
  adapters = ", ".join(f"{slot} {_describe(spec)}" for slot, spec in model["adapters"].items())
  lines = [f"model {model['config'] or 'custom'}, {adapters or 'no adapter'}, trainable mode "
           f"{account['trainable_mode']}"]
  if assumptions["image_size"]:
    lines.append(f"tokens per example: vision {tokens['vision']} patches "
                 f"({assumptions['image_size']}px / {assumptions['patch_size']}px patches); "
                 f"encoder {tokens['encoder_visual']} visual + {tokens['encoder_text']} text = "
                 f"{tokens['encoder']}; decoder {tokens['decoder']} "
                 f"(TASK_FEATURE_LENGTHS {assumptions['task_feature_lengths']})")
  else:
    lines.append(f"tokens per example: encoder {tokens['encoder']}, decoder "
                 f"{tokens['decoder']} (TASK_FEATURE_LENGTHS "
                 f"{assumptions['task_feature_lengths']})")
  lines.append("")
  header = ["parameters", "backbone"] + groups + ["total", "trainable"]
  rows = []
  for stack in accounting.STACKS:
    counts = params["by_stack"][stack]
    rows.append([stack] + [f"{counts[c]:,}" for c in ["backbone"] + groups]
                + [f"{counts['total']:,}", f"{counts['trainable']:,}"])
  rows.append(["total", f"{params['backbone']:,}"]
              + [f"{params['by_group'][g]:,}" for g in groups]
              + [f"{params['total']:,}", f"{params['trainable']:,}"])
  lines.append(_table(header, rows))
  lines.append("")
  lines.append(f"trainable: {params['trainable']:,} of {params['total']:,} parameters "
               f"({100 * params['trainable_fraction']:.3f}%), "
               f"{human(params['trainable_bytes'], 'B')}; frozen "
               f"{human(params['frozen_bytes'], 'B')}")
  states = ", ".join(f"{name}{' (this run)' if name == optimizer['name'] else ''} "
                     f"{human(nbytes, 'B')}"
                     for name, nbytes in optimizer["state_bytes"].items())
  lines.append(f"optimizer state (trainable parameters only): {states}")
  lines.append("")
  header = ["forward FLOPs / example", "tokens", "backbone"] + groups + [
      "backbone/token", "adapters/token", "adapters/backbone"]
  rows = []
  for stack in accounting.STACKS[:3]:
    f = flops[stack]
    ratio = f["adapters"] / f["backbone"] if f["backbone"] else 0.0
    rows.append([stack, f["tokens"], human(f["backbone"])]
                + [human(f["adapters_by_group"][g]) for g in groups]
                + [human(f["backbone_per_token"]), human(f["adapters_per_token"]),
                   f"{100 * ratio:.2f}%"])
  total = flops["total"]
  rows.append(["total", "", human(total["backbone"])]
              + [human(total["adapters_by_group"][g]) for g in groups]
              + ["", "", f"{100 * total['adapter_to_backbone']:.2f}%"])
  lines.append(_table(header, rows))
  lines.append("")
  lines.append(projection_table(account["adapted_projections"]))
  if account.get("mome"):
    lines.append("")
    lines.append(_table(["MoME part (omni_smola.mome_accounting)", "parameters", "closed form"],
                        [[part, f"{p['parameters']:,}", f"{p['closed_form']:,}"]
                         for part, p in account["mome"].items()]))
    lines.append("")
    lines.append(_table(["MoME part, stack", "forward FLOPs (closed form)"],
                        [[f"{part}, {stack}", human(f)]
                         for stack, parts in account["mome_flops"].items()
                         for part, f in parts.items()]))
    lines.append("The move and mome_mole columns above are these parts; the towers' FLOPs are "
                 "traced, under vision backbone")
  if account["closed_form_mismatches"]:
    lines.append("")
    lines.append("WARNING: adapter parameters differ from omni_smola.nn.accounting "
                 "(MoME parts: omni_smola.mome_accounting):")
    lines.extend("  " + m for m in account["closed_form_mismatches"])
  return "\n".join(lines)


def projection_table(adapted: Mapping[str, Sequence[str]]) -> str:
  """Which projections carry which adapter, a row per kind of projection ({i}: layers)."""
  if not adapted:
    return "adapted projections: none"
  rows = []
  for slot, paths in adapted.items():
    counts: Dict[str, int] = {}
    for path in paths:
      kind = re.sub(r"_\d+/", "_{i}/", path)
      counts[kind] = counts.get(kind, 0) + 1
    rows += [[kind, slot, count] for kind, count in sorted(counts.items())]
  return _table(["adapted projection (parameter path)", "adapter slot", "layers"], rows)


def format_plan(plan: Mapping[str, Any]) -> str:
  """The memory plan as the CLI prints it: bytes per device, XLA's analysis, the verdict."""
  mesh = " x ".join(f"{name} {size}" for name, size in plan["mesh"].items())
  mine, xla = plan["per_device_bytes"], plan["xla_bytes"]
  b = lambda n: human(n, "B")
  whole = plan["global_bytes"]
  inputs = [("parameters, trainable", "trainable_parameters"),
            ("parameters, frozen", "frozen_parameters"),
            (f"optimizer state ({plan['optimizer']})", "optimizer_state"),
            ("batch", "batch"), ("step + dropout key", "step_and_rng")]
  rows = [[label, b(mine[key]), "shardings", b(whole[key])] for label, key in inputs] + [
      ["inputs", b(plan["input_bytes"]), "shardings", b(sum(whole.values()))],
      ["  of which the step reads", b(xla["argument"]), "XLA", ""],
      ["outputs not aliased to donated inputs", b(xla["output"] - xla["alias"]), "XLA", ""],
      ["temporaries (activations, gradients, ...)", b(xla["temp"]), "XLA", ""],
      ["generated code", b(xla["generated_code"]), "XLA", ""],
      ["total", b(plan["total_bytes"]), "", ""],
      ["device memory", b(plan["device_memory_bytes"]), "--device_memory", ""],
  ]
  margin = plan["device_memory_bytes"] - plan["total_bytes"]
  verdict = (f"fits: yes ({b(margin)} to spare)" if plan["fits"] else
             f"fits: NO ({b(-margin)} over)")
  return "\n".join([
      f"memory plan of the train step of {plan['model']}: mesh {mesh} "
      f"({plan['num_devices']} simulated {plan['backend']} devices), BATCH_SIZE "
      f"{plan['batch_size']}, NUM_MICROBATCHES {plan['num_microbatches']}, "
      f"TASK_FEATURE_LENGTHS {plan['task_feature_lengths']}",
      "",
      _table(["per device", "bytes", "from", "all devices"], rows),
      "",
      verdict,
      f"trace + lower {plan['trace_and_lower_seconds']} s, compile "
      f"{plan['compile_seconds']} s (wall); {plan['cpu_seconds']} s of CPU",
  ])


def _describe(spec: Mapping[str, Any]) -> str:
  kind = spec["kind"]
  if kind == "omni_smola":
    experts = "/".join(str(spec["experts_per_group"][g]) for g in param_layout.GROUPS)
    return (f"omni_smola (rank {spec['rank']}, experts mm/vis/txt {experts}, "
            f"{spec['slots_per_expert']} slot(s)/expert, {spec['routing']} routing)")
  if kind == "smola":
    return f"smola (rank {spec['rank']}, {spec['num_experts']} experts, {spec['routing']})"
  if kind in ("lora",):
    return f"lora (rank {spec['rank']})"
  if kind == "mixlora":
    return f"mixlora (rank {spec['rank']} of {spec['num_factors']} factors)"
  if kind == "mole":
    return (f"mole (rank {spec['rank']}, top {spec['top_k']} of {spec['num_experts']}, "
            f"{spec['mole_level']} level)")
  return kind


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  console.quiet_terminal()
  request = launching.exit_on_user_error(lambda: plan_request(
      FLAGS.plan, FLAGS.mesh, FLAGS.num_devices, FLAGS.device_memory))
  if request is not None:
    # Before the log file: naming the process starts JAX, which fixes its devices.
    launching.exit_on_user_error(lambda: start_simulated_devices(request))
  launching.start_log_file(None, "params")

  def run():
    parse_config(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    if request is None:
      return account_from_gin()
    return plan_from_gin(request, " + ".join(FLAGS.gin_file) or "custom")

  result = launching.exit_on_user_error(run)
  print(format_table(result) if request is None else format_plan(result))
  if FLAGS.output:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    evaluator.write_json_atomically(FLAGS.output, result)
    print(f"\nwrote {FLAGS.output}", file=sys.stderr)



if __name__ == "__main__":
  launching.run(main)
