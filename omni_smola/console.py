"""What the binaries print in the terminal, and the log file that gets everything.

The terminal shows our own lines (one per phase, training progress, evaluation results,
our warnings) and anyone's errors. The log file in the run directory gets every record at
INFO and above, ours and the libraries' (seqio, TFDS, Orbax, JAX), plus what TensorFlow's
and XLA's C++ code writes to stderr (CUDA probes on a CPU machine, oneDNN notices). A
person can follow a run in the terminal, and the file holds the whole story.

C++ code writes to file descriptor 2 directly, around Python's logging, and starts as soon
as TensorFlow is imported, before the flags say where the run directory is. So a binary
run as a program first calls `hold_native_stderr()`: descriptor 2 goes to a temporary file
while Python's `sys.stderr` keeps the terminal. `log_to(path)` names the log file; once
the run has created its directory, the file receives what was held and descriptor 2
itself. A process that exits before that (a bad flag, a failed check) gives the held text
back to the terminal, so nothing is lost and nothing is written for a run that never
started. Only the binaries call
these; importing the library changes nothing.
"""
import atexit
import faulthandler
import logging as std_logging
import os
import sys
import tempfile
from typing import Optional

from absl import logging

_OUR_PACKAGES = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name) + os.sep
    for name in ("omni_smola", "tasks"))

# `logging.info(..., extra=FILE_ONLY)`: a detail for the log file, not the terminal.
FILE_ONLY = {"terminal": False}

_terminal = None  # a text stream on the terminal's stderr, once descriptor 2 is diverted
_held = None  # the temporary file descriptor 2 points at until the log file opens


def is_ours(record: std_logging.LogRecord) -> bool:
  return record.pathname.startswith(_OUR_PACKAGES)


class _TerminalFilter:
  """Our records at INFO and above, anyone's at ERROR and above; never FILE_ONLY ones."""

  def __init__(self):
    self.library_warnings = 0

  def filter(self, record: std_logging.LogRecord) -> bool:
    if not getattr(record, "terminal", True):
      return False
    if record.levelno >= std_logging.ERROR:
      return True
    if is_ours(record):
      return record.levelno >= std_logging.INFO
    if record.levelno >= std_logging.WARNING:
      self.library_warnings += 1
    return False


_filter = _TerminalFilter()


def _terminal_handler() -> std_logging.Handler:
  return logging.get_absl_handler().python_handler


def hold_native_stderr() -> None:
  """Diverts descriptor 2 to a temporary file; `sys.stderr` stays on the terminal."""
  global _terminal, _held
  if _terminal is not None:
    return
  sys.stderr.flush()
  _terminal = open(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
  _held = tempfile.TemporaryFile()
  os.dup2(_held.fileno(), 2)
  sys.stderr = _terminal
  _terminal_handler().stream = _terminal
  # A hard crash in native code still shows its Python stack in the terminal.
  faulthandler.enable(file=_terminal)
  _finish_at_exit()


# absl's layout, shortened for a person: `I1129 20:31:40 trainer.py:234] message`.
TERMINAL_FORMAT = "%(levelname).1s%(asctime)s %(filename)s:%(lineno)d] %(message)s"
TERMINAL_DATE_FORMAT = "%m%d %H:%M:%S"


def quiet_terminal() -> None:
  """The terminal gets our INFO lines and anyone's errors; libraries' chatter does not.

  From here on every record also waits for the log file `log_to` names.
  """
  handler = _terminal_handler()
  if _filter not in handler.filters:
    handler.addFilter(_filter)
  handler.setFormatter(std_logging.Formatter(TERMINAL_FORMAT, TERMINAL_DATE_FORMAT))
  root = std_logging.getLogger()
  if _run_log not in root.handlers:
    root.addHandler(_run_log)
    _finish_at_exit()
  if root.level > std_logging.INFO or root.level == std_logging.NOTSET:
    root.setLevel(std_logging.INFO)
  std_logging.captureWarnings(True)  # Python warnings become records: to the file only
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()


class _RunLogFile(std_logging.Handler):
  """Every record at INFO and above, in the run's log file once it is named and its
  directory exists.

  Until then records wait in memory, so a run that fails its start-up checks writes
  nothing (the terminal has its error), and a run that starts loses nothing.
  """

  MAX_WAITING = 100_000

  def __init__(self):
    super().__init__(std_logging.INFO)
    self.setFormatter(logging.PythonFormatter())
    self.path: Optional[str] = None
    self.stream = None
    self.waiting = []

  def emit(self, record: std_logging.LogRecord) -> None:
    if self.stream is None and not self.open_if_possible():
      if len(self.waiting) < self.MAX_WAITING:
        self.waiting.append(record)
      return
    self.stream.write(self.format(record) + "\n")

  def open_if_possible(self) -> bool:
    if self.stream is not None:
      return True
    if self.path is None or not os.path.isdir(os.path.dirname(self.path)):
      return False
    self.stream = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")
    if _held is not None:  # what native code wrote so far, then descriptor 2 itself
      _held.seek(0)
      self.stream.write(_held.read().decode("utf-8", "replace"))
      self.stream.flush()
      os.dup2(self.stream.fileno(), 2)
    for record in self.waiting:
      self.stream.write(self.format(record) + "\n")
    self.waiting = []
    return True


_run_log = _RunLogFile()


def log_to(path: str) -> str:
  """Names the log file: every record since `quiet_terminal`, and descriptor 2 if held."""
  path = os.path.abspath(path)
  if _run_log.path is not None and _run_log.path != path:
    raise ValueError(f"the log file is {_run_log.path} already; not also {path}")
  _run_log.path = path
  logging.info("Full log (libraries and native code included): %s", path)
  return path


_finish_registered = False


def _finish_at_exit() -> None:
  global _finish_registered
  if not _finish_registered:
    atexit.register(_finish)
    _finish_registered = True


def _finish() -> None:
  """At exit: the log file if the run made its directory; else held text to the terminal."""
  if _run_log.open_if_possible():
    return
  if _held is not None:
    _held.seek(0)
    _terminal.write(_held.read().decode("utf-8", "replace"))
    _terminal.flush()


def library_warning_count() -> int:
  """Library warnings kept out of the terminal so far (they are in the log file)."""
  return _filter.library_warnings
