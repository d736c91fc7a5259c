"""Jitted programs shared by the runs of one process, keyed by the values that define them.

A study trains dozens of runs in one process (`omni_smola.study`), and the demo several;
each `train()` used to build its programs anew: tracing the tiny model's init, train step
and decoder takes about 20 s a run on a CPU core, and reading their executables back from
JAX's persistent cache another 8 s, whatever the run's length. Runs of one arm differ only
in seed, task and directory, which no program depends on.

Inside `shared_programs()` a program is built once per key and reused by every later run
with an equal key; outside it (the default) nothing is shared and every call builds its own,
as before. A key is made of values: the model's and the optimizer's fingerprints (the repr
of what they were built from), shapes and shardings (hashable, compared by value, meshes
by their devices). A part with no value identity, such as a user's own schedule function,
makes the key None, and that program is never shared. The scope is explicit because code
can change under a process (a test patching a layer class): only callers that train several
runs of fixed code (the study runner, the demo) open it.
"""
import collections
import contextlib
import re
from typing import Any, Callable, Hashable, Optional

import jax

# repr of an object without value identity: a function, a lambda, a default object repr.
_NO_VALUE_IDENTITY = re.compile(r" at 0x[0-9a-f]+>")
MAX_PROGRAMS = 64  # least recently used first out: a long study keeps its arms' programs

_depth = 0
_programs: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()
stats = {"built": 0, "reused": 0}


def fingerprint(*parts) -> Optional[str]:
  """The repr of `parts`, or None when one of them has no value identity."""
  text = repr(parts)
  return None if _NO_VALUE_IDENTITY.search(text) else text


def tree_key(tree) -> Optional[Hashable]:
  """A pytree of hashable leaves (shardings, `ShapeDtypeStruct`s, ints) as a key part."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  try:
    hash(tuple(leaves))
  except TypeError:
    return None
  return treedef, tuple(leaves)


@contextlib.contextmanager
def shared_programs(store: "Optional[collections.OrderedDict]" = None):
  """Within: programs with equal keys are built once; leaving the outermost drops them.

  `store`, given to the outermost scope, holds its programs instead and keeps them after
  it: a caller that opens scopes one after another over fixed code (a test session's
  modules) shares programs between them too.
  """
  global _depth, _programs
  if store is not None:
    if _depth:
      raise ValueError("shared_programs(store): a store holds the programs of an outermost "
                       "scope; this one is nested in another, whose programs it would not see")
    _programs = store
  _depth += 1
  try:
    yield
  finally:
    _depth -= 1
    if _depth == 0:
      if store is None:
        _programs.clear()
      _programs = collections.OrderedDict()


@contextlib.contextmanager
def unshared():
  """Within: every program is built anew, inside a sharing scope too, and kept by nobody.

  For callers that read what tracing records (the accounting's `trace_records`): a shared
  program would hand them a result without the trace.
  """
  global _depth, _programs
  saved = _depth, _programs
  _depth, _programs = 0, collections.OrderedDict()
  try:
    yield
  finally:
    _depth, _programs = saved


def sharing() -> bool:
  return _depth > 0


def get_or_build(key: Optional[tuple], build: Callable[[], Any]) -> Any:
  """`build()`, or what it returned for an equal key in this scope (never for key None)."""
  if not sharing() or key is None or any(part is None for part in key):
    return build()
  if key in _programs:
    _programs.move_to_end(key)
    stats["reused"] += 1
    return _programs[key]
  program = build()
  stats["built"] += 1
  _programs[key] = program
  while len(_programs) > MAX_PROGRAMS:
    _programs.popitem(last=False)
  return program


def jit(key: Optional[tuple], fun: Callable, **jit_kwargs) -> Callable:
  """`jax.jit(fun, **jit_kwargs)`, shared with earlier calls of an equal `key` in scope.

  `key` must determine what `fun` computes (closures included) and the jit arguments'
  meaning beyond their own values; `jit_kwargs` (shardings, donation) are added to it.
  """
  kwargs_key = tuple(sorted((name, tree_key(value) if name.endswith("shardings") else value)
                            for name, value in jit_kwargs.items()))
  full_key = None if key is None else tuple(key) + (kwargs_key,)
  if full_key is not None and any(v is None for _, v in kwargs_key):
    full_key = None
  return get_or_build(full_key, lambda: jax.jit(fun, **jit_kwargs))
