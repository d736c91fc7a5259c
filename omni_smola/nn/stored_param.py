"""`stored_param`: a module's parameter, read as stored once it exists.

Flax's `Module.param` also re-runs the initialiser under `jax.eval_shape` each time it finds
the parameter already there (every `apply`), to compare shapes: one small trace per
parameter per trace of the model. The adapters have many small parameters, and that
re-tracing cost a tenth of the CPU of the study runner's tests (tests/test_study.py: 103 ->
92 user-seconds, on the same loaded machine). Here the stored value is checked against the shape the call
names, which costs no trace; the error is flax's own (`ScopeParamShapeError`). A missing
parameter is created by `Module.param`, so initialisation, names and boxing are unchanged.
"""
from typing import Any, Callable, Sequence

import jax.numpy as jnp
from flax import errors
from flax.core import meta


def stored_param(module, name: str, init_fn: Callable[..., Any], shape: Sequence[int],
                 dtype: Any = jnp.float32):
  """`module.param(name, init_fn, shape, dtype)`, without re-tracing `init_fn` on apply."""
  shape = tuple(shape)
  if module.has_variable("params", name):
    value = meta.unbox(module.get_variable("params", name))
    if tuple(jnp.shape(value)) != shape:
      raise errors.ScopeParamShapeError(name, module.scope.path_text, jnp.shape(value), shape)
    return value
  return module.param(name, init_fn, shape, dtype)
