"""What a training run recorded about its adapters: the specs in its MODEL_DIR/config.gin.

A checkpoint holds arrays only. A LoRA's `alpha` (its residual is scaled by alpha / r)
leaves no trace in them, so whoever rebuilds a model from a checkpoint alone must be told
alpha, and a wrong value is not detectable from the arrays. The trainer writes the run's
operative gin config beside its checkpoints (`MODEL_DIR/config.gin`), and that config
lists every field of every `AdapterSpec` the run built, defaults included:

    MODEL/AdapterPlan.specialist_adapter = @specialist/omni_smola.nn.adapter_spec.AdapterSpec()
    MODEL/specialist/AdapterSpec.alpha = 8.0
    MODEL/specialist/AdapterSpec.rank = 4

`recorded_spec(checkpoint, slot)` reads it back with gin's own parser, without touching
the process's gin configuration. It finds the config from any checkpoint path that
`training.checkpointing.resolve_checkpoint` accepts or returns (MODEL_DIR, its
`checkpoints/` or `best/` directory, a step directory).
"""
import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

from gin import config_parser

from omni_smola.nn.adapter_spec import AdapterSpec

RUN_CONFIG_FILE = "config.gin"  # training.trainer writes MODEL_DIR/config.gin
# A step dir is MODEL_DIR/{checkpoints,best}/<step>: the config is at most two levels up.
_LEVELS_UP = 2
_SPEC_FIELDS = {field.name for field in dataclasses.fields(AdapterSpec)}


class RunConfigError(ValueError):
  """A run config that does not say what a slot held; names the file and the binding."""


@dataclasses.dataclass(frozen=True)
class _Reference:
  name: str  # scoped, e.g. 'specialist/omni_smola.nn.adapter_spec.AdapterSpec'


@dataclasses.dataclass(frozen=True)
class _Macro:
  name: str


class _Delegate(config_parser.ParserDelegate):
  """Keeps references and macros as names: nothing is imported, built or registered."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    del evaluate
    return _Reference(scoped_configurable_name)

  def macro(self, macro_name):
    return _Macro(macro_name)


def find_run_config(checkpoint: str) -> Optional[str]:
  """MODEL_DIR/config.gin of `checkpoint` (itself or up to two parents), or None."""
  directory = os.path.abspath(checkpoint)
  for _ in range(_LEVELS_UP + 1):
    candidate = os.path.join(directory, RUN_CONFIG_FILE)
    if os.path.isfile(candidate):
      return candidate
    directory = os.path.dirname(directory)
  return None


def _bindings(path: str) -> Dict[Tuple[str, str, str], Any]:
  """{(scope, configurable's short name, argument): value}; macros under ('', NAME, '')."""
  with open(path) as f:
    text = f.read()
  bindings = {}
  try:
    for statement in config_parser.ConfigParser(text, _Delegate()):
      if isinstance(statement, config_parser.BindingStatement):
        short = statement.selector.rsplit(".", 1)[-1]
        bindings[(statement.scope, short, statement.arg_name)] = statement.value
  except SyntaxError as e:
    raise RunConfigError(f"{path}: not a gin config ({e})") from None
  return bindings


def _resolve(bindings, value, path: str, seen=()):
  """A value with its macros replaced by what they were bound to."""
  if isinstance(value, _Macro):
    if value.name in seen or ("", value.name, "") not in bindings:
      raise RunConfigError(f"{path}: macro %{value.name} is unbound or circular")
    return _resolve(bindings, bindings[("", value.name, "")], path, seen + (value.name,))
  return value


def recorded_spec(checkpoint: str, slot: str) -> Tuple[Optional[str], Optional[AdapterSpec]]:
  """(the run config read, the AdapterSpec its model had in `slot`).

  (None, None) when the checkpoint has no run config beside it; (path, None) when the
  run's `slot` was empty. A config that binds the slot more than once (two models) or
  to something other than an AdapterSpec is a `RunConfigError` naming the file.
  """
  path = find_run_config(checkpoint)
  if path is None:
    return None, None
  bindings = _bindings(path)
  plans = {scope: _resolve(bindings, value, path)
           for (scope, name, arg), value in bindings.items()
           if name == "AdapterPlan" and arg == slot}
  if not plans:
    return path, None  # the field kept its default: no adapter in that slot
  if len(set(map(repr, plans.values()))) > 1:
    raise RunConfigError(f"{path} binds AdapterPlan.{slot} differently in scopes "
                         f"{sorted(plans)}: which model the checkpoint holds is ambiguous")
  plan_scope, value = sorted(plans.items())[0]
  if value is None:
    return path, None
  if not isinstance(value, _Reference) or not value.name.endswith("AdapterSpec"):
    raise RunConfigError(f"{path}: AdapterPlan.{slot} = {value!r} is not an AdapterSpec")
  reference_scope = value.name.rpartition("/")[0]
  scope = "/".join(part for part in (plan_scope, reference_scope) if part)
  fields = {arg: _resolve(bindings, field_value, path)
            for (binding_scope, name, arg), field_value in bindings.items()
            if binding_scope == scope and name == "AdapterSpec" and arg in _SPEC_FIELDS}
  if "rank" not in fields or "alpha" not in fields:
    raise RunConfigError(f"{path} records no {scope + '/' if scope else ''}AdapterSpec "
                         f"rank and alpha for AdapterPlan.{slot} (not an operative config?)")
  return path, AdapterSpec(**fields)
