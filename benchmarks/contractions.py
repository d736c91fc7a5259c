"""The matrix products a function performs, replayed on their own.

A wall-time ratio mixes two things: how fast the device multiplies matrices of
the shapes involved (a `[1024, 1024] x [1024, 96]` product runs well below a
square one's rate on most hardware) and what the implementation spends around
its products (softmaxes, slices, transposes, small ops). Replaying exactly the
`dot_general`s of a traced function, on fresh operands of the same shapes and
nothing else, measures the first alone. A benchmark reporting both shows how
much of a gap is the implementation's and how much is the device's rate for
those contractions.
"""
import math
from typing import Callable, List, Sequence, Tuple

import jax
import jax.extend.core
from jax import lax

LOOP_PRIMITIVES = ("scan", "while", "fori_loop")


def _sub_jaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def dot_generals(fn: Callable, *args) -> List[Tuple]:
  """(lhs shape, rhs shape, dtype, dimension_numbers) of every product `fn` runs.

  Products inside nested calls (jit, custom_vjp, remat) are included once per
  call; a loop would run its body an unknown number of times, so it is refused.
  """
  found = []

  def walk(jaxpr):
    for equation in jaxpr.eqns:
      name = equation.primitive.name
      if name in LOOP_PRIMITIVES:
        raise ValueError(f"cannot count the products of a `{name}` loop")
      if name == "dot_general":
        lhs, rhs = (v.aval for v in equation.invars)
        found.append((lhs.shape, rhs.shape, lhs.dtype, equation.params["dimension_numbers"]))
      for value in equation.params.values():
        for sub in _sub_jaxprs(value):
          walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def replay(products: Sequence[Tuple], seed: int = 0):
  """A jitted function running only `products`, and its operands (arguments,
  so nothing is constant-folded; each product gets its own, so none is shared)."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 2 * max(len(products), 1))
  operands, numbers = [], []
  for index, (lhs_shape, rhs_shape, dtype, dimension_numbers) in enumerate(products):
    operands.append((jax.random.normal(keys[2 * index], lhs_shape, dtype),
                     jax.random.normal(keys[2 * index + 1], rhs_shape, dtype)))
    numbers.append(dimension_numbers)

  @jax.jit
  def run(operands):
    return [lax.dot_general(lhs, rhs, dims) for (lhs, rhs), dims in zip(operands, numbers)]

  return run, operands


def product_flops(products: Sequence[Tuple]) -> int:
  """Multiply-adds x 2 of `products`: lhs size x rhs size / (contracted x batch)."""
  total = 0
  for lhs_shape, rhs_shape, _, ((lhs_contract, _), (lhs_batch, _)) in products:
    shared = math.prod(lhs_shape[axis] for axis in (*lhs_contract, *lhs_batch))
    total += 2 * math.prod(lhs_shape) * math.prod(rhs_shape) // shared
  return total
