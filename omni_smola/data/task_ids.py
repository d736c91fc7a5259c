"""Stable integer ids for registered tasks, carried by every example as `task_id`.

The id is `omni_smola.task_id.task_id`, a CRC of the task name, so it is the same in every
process, on every host and in every run; routing statistics saved by one run can be read by
another. Mapping an id back to its name looks the id up among the tasks registered in this
process.
"""
from __future__ import annotations

import seqio

from omni_smola.task_id import task_id

_id_to_name: dict[int, str] = {}


def claim_task_id(name: str) -> int:
  """Records `name`'s id so `task_name` can find it; raises on a (very unlikely) collision."""
  identifier = task_id(name)
  holder = _id_to_name.setdefault(identifier, name)
  if holder != name:
    raise ValueError(f"Tasks {holder!r} and {name!r} hash to the same task_id {identifier}; "
                     "rename one of them.")
  return identifier


def task_name(identifier: int) -> str:
  """The name of the registered task whose id is `identifier` (KeyError if none)."""
  identifier = int(identifier)
  if identifier not in _id_to_name:
    for name in seqio.TaskRegistry.names():
      if task_id(name) == identifier:
        _id_to_name[identifier] = name
        break
    else:
      raise KeyError(f"No registered task has task_id {identifier}.")
  return _id_to_name[identifier]


def task_ids(names) -> dict[str, int]:
  """{name: id} for several tasks, e.g. the sub-tasks of a mixture."""
  return {name: task_id(name) for name in names}
