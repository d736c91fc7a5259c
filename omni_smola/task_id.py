"""The stable integer id of a task name, carried by every example as `task_id`.

A 31-bit CRC of the name: the same in every process, on every host and in every run,
whatever order tasks were registered or imported in. It lives on its own, with nothing
but `zlib`, because the model needs it too (a specialist bank matches an example's
`task_id` against its tasks' names) and the model must not import the data pipeline
(seqio, TensorFlow). `omni_smola.data.task_ids` maps ids back to registered tasks.
"""
import zlib


def task_id(name: str) -> int:
  """The stable int32 id of the task called `name`."""
  return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF
