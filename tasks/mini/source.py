"""Where the mini dataset lives, and a seqio source that builds it there on first use.

The data directory is, in order of precedence:
  1. `set_data_dir(path)` / `prepare(data_dir=path)` (a function argument);
  2. seqio's TFDS data-dir override, which the trainer sets from `--tfds_data_dir`;
  3. the environment variable OMNI_SMOLA_MINI_DATA_DIR;
  4. TFDS's default data dir ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import os
from typing import Optional

from absl import logging
import seqio
import tensorflow_datasets as tfds

from omni_smola import console
from omni_smola.data import registration
from tasks.mini import builder as mini_builder
from tasks.mini.common import SPLITS

DATA_DIR_ENV = "OMNI_SMOLA_MINI_DATA_DIR"
_explicit_data_dir: Optional[str] = None


def set_data_dir(data_dir: Optional[str]) -> None:
  """Sets (None: unsets) the directory the mini dataset is built into and read from."""
  global _explicit_data_dir
  _explicit_data_dir = os.fspath(data_dir) if data_dir is not None else None


def resolve_data_dir() -> Optional[str]:
  """The mini dataset's data dir, or None for TFDS's default (see the module docstring)."""
  if _explicit_data_dir:
    return _explicit_data_dir
  seqio_override = seqio.utils.LazyTfdsLoader(name=tfds_name("tiny")).data_dir
  return seqio_override or os.environ.get(DATA_DIR_ENV) or None


def tfds_name(config: str, builder: type = mini_builder.MiniVl) -> str:
  """`builder`'s dataset name at `config` and its version, e.g. mini_vl/full:1.2.0."""
  return f"{builder.name}/{config}:{builder.VERSION}"


@contextlib.contextmanager
def _lock(directory: str):
  """An exclusive lock on a local data dir, so parallel processes build the data once."""
  if "://" in directory:  # object stores have no file locks; TFDS still writes atomically
    yield
    return
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, ".mini_vl.lock"), "w") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_builder(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Generates the builder's dataset unless its data dir already holds it."""
  if builder.is_prepared():
    return builder
  data_root = os.fspath(builder.data_dir).rsplit(os.sep, 3)[0]  # .../<dataset>/<config>/<version>
  with _lock(data_root):
    if builder.data_path.exists():  # built by another process while we waited
      builder.info.read_from_directory(builder.data_dir)
    else:
      logging.info("Generating the mini dataset %s into %s", builder.info.full_name,
                   builder.data_dir)
      # TFDS prints its "Downloading and preparing" lines to stdout: keep them for the log.
      with contextlib.redirect_stdout(io.StringIO()) as printed:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
      logging.info("TFDS: %s", printed.getvalue().strip(), extra=console.FILE_ONLY)
  return builder


def prepare(config: str = "full", data_dir: Optional[str] = None,
            builder: type = mini_builder.MiniVl) -> tfds.core.DatasetBuilder:
  """Builds `builder`'s dataset (`config` "full" or "tiny") if needed and returns it.

  `data_dir` also becomes the directory every mini task reads from (`set_data_dir`).
  """
  if data_dir is not None:
    set_data_dir(data_dir)
  return prepare_builder(tfds.builder(tfds_name(config, builder), data_dir=resolve_data_dir()))


class MiniTfdsSource(registration.VLTfdsSource):
  """The mini dataset's splits of one sub-task; builds the dataset on first use."""

  def __init__(self, config: str, subtask: str):
    super().__init__(
        tfds_name=tfds_name(config, mini_builder.BUILDERS[subtask]),
        splits={split: mini_builder.split_name(subtask, split) for split in SPLITS},
        decoders={"image": tfds.decode.SkipDecoding()},
        read_only=True)

  def _ensure_prepared(self) -> None:
    directory = resolve_data_dir()
    if directory and self.tfds_dataset.data_dir != directory:
      self.tfds_dataset.override_data_dir(directory)
    prepare_builder(self.tfds_dataset.builder)

  def get_dataset(self, *args, **kwargs):
    self._ensure_prepared()
    return super().get_dataset(*args, **kwargs)

  def num_input_examples(self, split: str) -> int:
    self._ensure_prepared()
    return super().num_input_examples(split)

  def list_shards(self, split: str):
    self._ensure_prepared()
    return super().list_shards(split)
