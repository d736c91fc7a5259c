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
"""
if __name__ == "__main__":
  from omni_smola import console  # pylint: disable=g-import-not-at-top
  console.hold_native_stderr()  # before TensorFlow loads and prints its start-up lines

import json
import os
import re
import sys
from typing import Any, Dict, Mapping, Sequence

from absl import flags
import gin

from omni_smola import accounting
from omni_smola import console
from omni_smola import launching
from omni_smola import param_layout

flags.DEFINE_string("output", None, "Write the accounting as JSON to this path.")

FLAGS = flags.FLAGS

# Parsed before the user's files, so these are defaults a config or flag overrides, and
# the macros count as used (`--gin.TASK_FEATURE_LENGTHS=...` is then always accepted).
DEFAULTS = f"""
TASK_FEATURE_LENGTHS = {accounting.DEFAULT_TASK_FEATURE_LENGTHS!r}
TRAINABLE_MODE = 'adapters'
omni_smola.params.run_macros.model = %MODEL
omni_smola.params.run_macros.task_feature_lengths = %TASK_FEATURE_LENGTHS
omni_smola.params.run_macros.trainable_mode = %TRAINABLE_MODE
"""


@gin.configurable(module="omni_smola.params")
def run_macros(model=gin.REQUIRED, task_feature_lengths=None,
               trainable_mode="adapters"):
  """What the accounting needs from the run's macros (bound in DEFAULTS)."""
  return model, task_feature_lengths, trainable_mode


def _resolve(value):
  """A gin binding's value with references (`@f()`, `%MACRO`) evaluated."""
  if isinstance(value, gin.config.ConfigurableReference):
    fn = value.scoped_configurable_fn
    return _resolve(fn()) if value.evaluate else fn
  if isinstance(value, (list, tuple)):
    return type(value)(_resolve(v) for v in value)
  if isinstance(value, dict):
    return {k: _resolve(v) for k, v in value.items()}
  return value


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
  if account["closed_form_mismatches"]:
    lines.append("")
    lines.append("WARNING: adapter parameters differ from omni_smola.nn.accounting:")
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
  launching.start_log_file(None, "params")

  def run():
    parse_config(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    return account_from_gin()

  account = launching.exit_on_user_error(run)
  print(format_table(account))
  if FLAGS.output:
    directory = os.path.dirname(os.path.abspath(FLAGS.output))
    os.makedirs(directory, exist_ok=True)
    with open(FLAGS.output, "w") as f:
      json.dump(account, f, indent=2, sort_keys=False)
    print(f"\nwrote {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
  launching.run(main)
