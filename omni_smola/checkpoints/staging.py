"""An output directory written whole or not at all.

Exports write into a temporary directory beside the target (same filesystem, so a
rename moves it) and rename it into place only once every file is written: a
failure or an interrupt leaves the target as it was, never half-written.
"""
import contextlib
import os
import shutil
import tempfile


class OutputExistsError(ValueError):
  """The output directory exists and is not empty, and overwriting was not asked for."""


def check_output_dir(target: str, overwrite: bool = False) -> None:
  """Raises OutputExistsError, naming `target`, unless it is absent, empty or may go."""
  if os.path.isfile(target):
    raise OutputExistsError(f"output path {target} is a file, not a directory")
  if os.path.isdir(target) and os.listdir(target) and not overwrite:
    raise OutputExistsError(f"output directory {target} exists and is not empty; pass "
                            "--overwrite to replace it")


@contextlib.contextmanager
def staged_directory(target: str, overwrite: bool = False):
  """Yields a fresh directory that becomes `target` when the block succeeds.

  An existing `target` (empty, or any with `overwrite`) is moved aside first and
  deleted only after the new one is in place.
  """
  target = os.path.abspath(target)
  check_output_dir(target, overwrite)
  parent, name = os.path.split(target)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  mask = os.umask(0)
  os.umask(mask)
  os.chmod(staging, 0o777 & ~mask)  # mkdtemp's 0700 would make the export private
  try:
    yield staging
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  old = None
  if os.path.exists(target):
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rename(target, os.path.join(old, name))
  os.rename(staging, target)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
