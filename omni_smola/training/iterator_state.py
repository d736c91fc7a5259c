"""The input iterator's state, saved in each checkpoint's step directory.

    checkpoints/<step>/data_iterator/process_<i>-of-<n>.index
    checkpoints/<step>/data_iterator/process_<i>-of-<n>.data-00000-of-00001

Each process saves its own tf.data iterator (the shard it reads) with
`tf.train.Checkpoint`: the positions of every reader, the shuffle buffers and
random generators' states, the mixture's sampler. Restoring it continues the
pipeline where it stopped, whatever the position, instead of pulling every
consumed batch through the pipeline again (`dataset.skip`), which is what
makes a resume O(position). DESIGN.md, "Resuming the input", says why
tf.data's own checkpoints and not another library's.

The state is an Orbax item of the step, so it is inside the same atomic
commit as the train state: a step directory that exists holds both, or it is
a temporary directory Orbax ignores. Saving serialises the iterator at once
(into TensorFlow's in-memory `ram://` file system, while the training loop
waits, so the state is the position of the checkpoint), and writes the bytes
in Orbax's background commit with the rest of the step.
"""
import dataclasses
import os
import uuid
from typing import Any, Dict, List, Optional, Tuple

from etils import epath
import jax
import orbax.checkpoint as ocp
import tensorflow as tf

DATA_ITERATOR_ITEM = "data_iterator"
_SCRATCH = "ram://omni_smola_data_iterator"
_PREFIX = "state"  # the prefix tf.train.Checkpoint writes under, in the scratch directory
Trackable = Any  # a tf.data iterator (`iter(dataset)`, `dataset.as_numpy_iterator()`)


def state_name(process_index: int, process_count: int) -> str:
  """This process's file prefix: a state read by another host count is never found."""
  return f"process_{process_index}-of-{process_count}"


def serialize(iterator: Trackable) -> Dict[str, bytes]:
  """{file suffix: bytes} of a tf.data iterator's checkpoint (`.index`, `.data-*`)."""
  scratch = f"{_SCRATCH}/{uuid.uuid4().hex}"
  try:
    tf.train.Checkpoint(iterator=iterator).write(f"{scratch}/{_PREFIX}")
    files = {}
    for path in tf.io.gfile.glob(f"{scratch}/{_PREFIX}.*"):
      with tf.io.gfile.GFile(path, "rb") as f:
        files[os.path.basename(path)[len(_PREFIX):]] = f.read()
    return files
  finally:
    if tf.io.gfile.exists(scratch):
      tf.io.gfile.rmtree(scratch)


def restore(iterator: Trackable, prefix: str) -> None:
  """Puts a saved state into `iterator` (built from the same pipeline)."""
  tf.train.Checkpoint(iterator=iterator).read(prefix).assert_consumed()


def locate(step_dir: str) -> Tuple[Optional[str], Optional[str]]:
  """(this process's state prefix, None), or (None, why there is none)."""
  item = os.path.join(step_dir, DATA_ITERATOR_ITEM)
  if not tf.io.gfile.isdir(item):
    return None, (f"the checkpoint has no input iterator state ({item} does not exist: "
                  "saved before iterator states were, or with "
                  "CheckpointConfig.save_data_iterator=False)")
  prefix = os.path.join(item, state_name(jax.process_index(), jax.process_count()))
  if not tf.io.gfile.exists(prefix + ".index"):
    saved = sorted({name.split(".")[0] for name in tf.io.gfile.listdir(item)
                    if name.startswith("process_")})
    return None, (f"the checkpoint has no input iterator state for this process "
                  f"({os.path.basename(prefix)}; it holds {saved or 'none'})")
  return prefix, None


@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Trackable


@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Trackable


class DataIteratorHandler(ocp.handlers.AsyncCheckpointHandler):
  """Orbax handler of the `data_iterator` item: one tf.data state per process."""

  async def async_save(self, directory: epath.Path, args: DataIteratorSave
                       ) -> Optional[List[ocp.future.Future]]:
    files = serialize(args.iterator)  # now: the loop waits, so this is the saved position
    name = state_name(jax.process_index(), jax.process_count())

    async def write():
      for suffix, payload in files.items():
        (directory / (name + suffix)).write_bytes(payload)

    # Waits for Orbax to create the (temporary) item directory, on every host.
    return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="data_iterator")]

  def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
    name = state_name(jax.process_index(), jax.process_count())
    for suffix, payload in serialize(args.iterator).items():
      (directory / (name + suffix)).write_bytes(payload)

  def restore(self, directory: epath.Path, args: DataIteratorRestore) -> None:
    restore(args.iterator, str(directory / state_name(jax.process_index(),
                                                      jax.process_count())))


ocp.args.register_with_handler(DataIteratorHandler, for_save=True)(DataIteratorSave)
ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)(DataIteratorRestore)
