"""What the train / eval / infer binaries share: flags, gin parsing, multi-host start-up.

Flags follow t5x:
  --gin_file=PATH            repeatable; a relative PATH (and every gin `include`) is looked
                             up in --gin_search_paths, then in the working directory
                             (omni_smola/gin_files.py)
  --gin_search_paths=A,B     default: this repository's gin_configs/
  --gin.NAME=VALUE           a gin binding, e.g. --gin.TRAIN_STEPS=1000; a VALUE that is
                             not a Python literal or gin reference is taken as a string,
                             so --gin.MODEL_DIR=/tmp/run needs no extra quotes
  --gin_bindings='X = Y'     the same, t5x's long form
  --tfds_data_dir=DIR        where TFDS (and the mini mixture) datasets live
  --coordinator_address, --process_count, --process_index
                             multi-host: passed to jax.distributed.initialize; on a
                             multi-host Cloud TPU it is called without them (auto-detect)
"""
import ast
import difflib
import os
import re
import sys
import tempfile
from typing import Any, Callable, Iterable, List, Optional, Sequence

from absl import flags
from absl import logging
import gin

from omni_smola import console
from omni_smola import gin_files as gin_files_lib

REPO_GIN_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "gin_configs")

flags.DEFINE_multi_string("gin_file", [], "Gin config files, in order.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings ('NAME = VALUE').")
flags.DEFINE_list("gin_search_paths", [REPO_GIN_CONFIGS],
                  "Directories searched for --gin_file and gin includes.")
flags.DEFINE_string("tfds_data_dir", None, "TFDS data dir (seqio's override).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("process_count", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_index", None, "This process's index (multi-host).")

FLAGS = flags.FLAGS


class GinConfigError(ValueError):
  """A gin file or binding that does not parse or names nothing."""


class FlagError(ValueError):
  """A command-line flag that is missing, conflicts with another, or names nothing."""


def _as_gin_value(value: str) -> str:
  """VALUE as gin reads it; bare words and paths become strings."""
  text = value.strip()
  if not text or text[0] in "@%":
    return text
  try:
    ast.literal_eval(text)
    return text
  except (ValueError, SyntaxError):
    return repr(text)


def rewrite_gin_args(argv: Sequence[str]) -> List[str]:
  """`--gin.NAME=VALUE` -> `--gin_bindings=NAME = VALUE`; other arguments unchanged."""
  rewritten = []
  for arg in argv:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep or not name:
        raise GinConfigError(f"{arg!r}: write --gin.NAME=VALUE")
      arg = f"--gin_bindings={name} = {_as_gin_value(value)}"
    rewritten.append(arg)
  return rewritten


def _referenced_macros() -> set:
  """Names used as %MACRO anywhere in the parsed config (best effort: gin internals)."""
  found = set()

  def walk(value):
    if isinstance(value, gin.config.ConfigurableReference):
      scope, _, selector = value.scoped_selector.rpartition("/")
      if selector.endswith("macro") and scope:
        found.add(scope.split("/")[-1])
    elif isinstance(value, dict):
      for v in value.values():
        walk(v)
    elif isinstance(value, (list, tuple, set)):
      for v in value:
        walk(v)
  try:
    for bindings in gin.config._CONFIG.values():  # pylint: disable=protected-access
      walk(bindings)
  except Exception:  # pylint: disable=broad-except
    return set()
  return found


def _macro_names(bindings: Iterable[str]) -> List[str]:
  names = []
  for binding in bindings:
    match = re.match(r"\s*([A-Z][A-Z0-9_]*)\s*=", binding)
    if match:
      names.append(match.group(1))
  return names


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              search_paths: Sequence[str] = (REPO_GIN_CONFIGS,),
              finalize: bool = True) -> None:
  """Parses gin files and bindings; errors name the file or binding at fault.

  A command-line binding of a macro no config uses (`--gin.TRAIN_STEP=10`) is an
  error too, since gin itself would silently ignore it.
  """
  gin_files_lib.install(search_paths)
  try:
    resolved = [gin_files_lib.resolve(f, search_paths) for f in gin_files]
  except gin_files_lib.GinFileNotFoundError as e:
    raise GinConfigError(str(e)) from None
  try:
    gin.parse_config_files_and_bindings(resolved, list(gin_bindings), finalize_config=False)
  except (ValueError, KeyError, SyntaxError, IOError) as e:
    raise GinConfigError(f"bad gin config: {e}") from None
  referenced = _referenced_macros()
  if referenced:
    unused = [n for n in _macro_names(gin_bindings) if n not in referenced]
    if unused:
      hints = {n: difflib.get_close_matches(n, sorted(referenced), n=1) for n in unused}
      raise GinConfigError("gin macros set on the command line but used by no config: " +
                           ", ".join(f"{n}" + (f" (did you mean {h[0]}?)" if h else "")
                                     for n, h in hints.items()))
  _import_task_modules()
  if finalize:
    try:
      gin.finalize()
    except ValueError as e:
      required = re.match(r"(\w+)/macro\.value set to `%gin\.REQUIRED`", str(e))
      if required:
        name = required.group(1)
        raise GinConfigError(f"{name} is required and not set: pass --gin.{name}=...") from None
      raise GinConfigError(f"bad gin config: {e}") from None


def _import_task_modules() -> None:
  """Imports MIXTURE_OR_TASK_MODULE now: task modules may register gin configurables,
  which gin refuses once the config is final."""
  import importlib  # pylint: disable=g-import-not-at-top
  modules = macro_value("MIXTURE_OR_TASK_MODULE")
  for module in [modules] if isinstance(modules, str) else list(modules or ()):
    importlib.import_module(module)


def parse_gin_from_flags(finalize: bool = True) -> None:
  parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths, finalize)


def macro_value(name: str, default=None):
  """The value gin's macro NAME is bound to (`default` when it is not bound)."""
  try:
    return gin.query_parameter(f"{name}/macro.value")
  except ValueError:
    return default


def evaluated_macro(name: str):
  """What gin's macro NAME evaluates to (`%MODEL`: the configured model instance)."""
  return evaluated(gin.query_parameter(f"{name}/macro.value"))


def evaluated(value):
  """A gin binding's value with references (`@f()`, `%MACRO`) evaluated."""
  if isinstance(value, gin.config.ConfigurableReference):
    fn = value.scoped_configurable_fn
    return evaluated(fn()) if value.evaluate else fn
  if isinstance(value, (list, tuple)):
    return type(value)(evaluated(v) for v in value)
  if isinstance(value, dict):
    return {k: evaluated(v) for k, v in value.items()}
  return value


def start_log_file(directory: Optional[str], binary: str) -> str:
  """The run's log file, `<directory>/<binary>.log` (one per process on multi-host).

  A directory on an object store (gs://...), or none, puts it in the local temp dir.
  """
  import jax  # pylint: disable=g-import-not-at-top
  suffix = f".process_{jax.process_index()}" if jax.process_count() > 1 else ""
  if not directory or "://" in str(directory):
    directory = os.path.join(tempfile.gettempdir(), f"omni_smola_logs_{os.getuid()}")
    os.makedirs(directory, exist_ok=True)  # no run creates this one
  return console.log_to(os.path.join(str(directory), f"{binary}{suffix}.log"))


def initialize_distributed(coordinator_address: Optional[str] = None,
                           process_count: Optional[int] = None,
                           process_index: Optional[int] = None) -> None:
  """`jax.distributed.initialize` when several processes are given or a pod provides them."""
  import jax  # pylint: disable=g-import-not-at-top
  if coordinator_address:
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if "cpu" in platforms:
      # Several CPU processes talk through gloo (docs/DESIGN.md, 6. Sharding).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=process_count, process_id=process_index)
  elif len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    jax.distributed.initialize()  # a multi-host Cloud TPU: JAX reads the topology
  else:
    return
  logging.info("Process %d of %d; %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def initialize_from_flags() -> None:
  """Multi-host start-up and the TFDS data dir, from the flags."""
  console.quiet_terminal()
  initialize_distributed(FLAGS.coordinator_address, FLAGS.process_count, FLAGS.process_index)
  if FLAGS.tfds_data_dir:
    import seqio  # pylint: disable=g-import-not-at-top
    seqio.set_tfds_data_dir_override(FLAGS.tfds_data_dir)


def run(main, argv: Optional[Sequence[str]] = None) -> None:
  """absl's app.run with `--gin.NAME=VALUE` rewritten first."""
  from absl import app  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv if argv is None else argv)
  try:
    argv = rewrite_gin_args(argv)
  except GinConfigError as e:
    sys.exit(f"error: {e}")
  app.run(main, argv=argv)


def user_errors() -> tuple:
  """Exceptions that mean bad input or a failed run, not a bug: reported without traceback."""
  # pylint: disable=g-import-not-at-top
  from omni_smola.checkpoints.adapter_export import AdapterFormatError
  from omni_smola.checkpoints.merge import NothingToMergeError
  from omni_smola.checkpoints.restore import CheckpointMismatchError
  from omni_smola.checkpoints.staging import OutputExistsError
  from omni_smola.data.images import CorruptImageError
  from omni_smola.nn import AdapterConfigError
  from omni_smola.param_layout import LayerLayoutError
  from omni_smola.partitioning import MeshDoesNotFitError
  from omni_smola.training.checkpointing import CheckpointWriteError, UnreadableCheckpointError
  from omni_smola.training.data_iterator import UnknownTaskError
  from omni_smola.training.faults import NonFiniteLossError
  from omni_smola.training.trainer import MissingSettingError
  return (GinConfigError, FlagError, FileNotFoundError, CheckpointMismatchError,
          AdapterConfigError, UnknownTaskError, NonFiniteLossError, MissingSettingError,
          NothingToMergeError, OutputExistsError, MeshDoesNotFitError, LayerLayoutError,
          AdapterFormatError, CheckpointWriteError, UnreadableCheckpointError,
          CorruptImageError)


def run_configured(argv: Sequence[str], binary: str, log_dir_macro: Optional[str],
                   fn: Callable[[], Any]) -> Any:
  """A gin-configured binary's body: flags, gin, its log file, then `fn()`.

  The log file goes to the directory the macro `log_dir_macro` names (None: the
  temporary log directory, `start_log_file`). A configuration or input error exits 1
  with its message (`exit_on_user_error`); the result of `fn` is returned.
  """
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  initialize_from_flags()

  def run():
    parse_gin_from_flags()
    start_log_file(macro_value(log_dir_macro) if log_dir_macro else None, binary)
    return fn()

  return exit_on_user_error(run)


def _is_missing_binding(error: Exception) -> bool:
  return isinstance(error, (ValueError, RuntimeError)) and "Required bindings" in str(error)


def exit_on_user_error(fn):
  """Runs `fn()`; a configuration or input error exits 1 with its message, no traceback."""
  # Imported before `fn` runs: these modules register gin configurables, which gin
  # refuses once `fn` has locked the config (and the refusal would hide the error).
  expected = user_errors()
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    if not (isinstance(e, expected) or _is_missing_binding(e)):
      raise
    message = str(e)
    if _is_missing_binding(e):
      message += ("\n(set the missing macros, e.g. --gin.MODEL_DIR=/path/to/run, "
                  "--gin.MIXTURE_OR_TASK_NAME=..., --gin.TRAIN_STEPS=...)")
    # The log file's copy; the terminal gets the exit message.
    logging.error("%s: %s", type(e).__name__, message, extra=console.FILE_ONLY)
    sys.exit(f"error ({type(e).__name__}): {message}")
