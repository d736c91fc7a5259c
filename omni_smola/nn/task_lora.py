"""A bank of LoRA specialists, one per task, served together: each example gathers its own.

The generalist -> specialist recipe (`runs/specialist.gin`) trains one LoRA per task on top
of a frozen generalist. Serving them one task at a time means one batch, and one set of
parameters, per task. Here the specialists' factors are stacked on a leading `specialists`
axis and every example takes its task's row by one gather, so examples of different tasks
share a batch and one compiled step, whatever mix of tasks the batch holds.

Letters: b batch, t token, d input width, r rank, f output width, n specialists.

    lora_a [n, d, r], lora_b [n, r, f]      row i is the LoRA of `tasks[i]`
    rows   [b]                              the row of each example's task id
    x [b, t, d] -> (alpha / r) x A[rows] B[rows]   (`btd,bdr->btr`, `btr,brf->btf`)

An example whose task id is not in the bank gets no residual: it is served by the
generalist alone. The binaries refuse such a task before they run (`infer`, `eval`), so the
case only arises from Python; in a jitted step there is nothing better to do with it.
"""
from typing import Tuple

import flax.linen as nn
import jax.numpy as jnp

from omni_smola.task_id import task_id  # not omni_smola.data: no TensorFlow here
from omni_smola.nn.low_rank import LowRankAdapter
from omni_smola.nn.products import product


class TaskLoRA(LowRankAdapter):
  """LoRA specialists stacked over `tasks`; the context's `task_ids` pick one per example."""
  tasks: Tuple[str, ...]
  rank: int
  scale: float

  @nn.compact
  def __call__(self, x, context):
    """x: [b, t, d] -> [b, t, f]."""
    a, b = self.factors(("lora_a", "lora_b"), self.rank,
                        stacked=((len(self.tasks), "specialists"),))
    if context is None or context.task_ids is None:
      raise ValueError(
          f"{'/'.join(self.scope.path)}: a task_lora bank needs each example's task id "
          "(TokenContext.task_ids, from the batch's `task_id` feature), which this "
          "projection was not given")
    rows, known = self.rows(context.task_ids)
    # One gather per example and factor: [b, d, r] and [b, r, f], never a loop over tasks.
    a_rows = jnp.take(jnp.asarray(a, self.dtype), rows, axis=0)
    b_rows = jnp.take(jnp.asarray(b, self.dtype), rows, axis=0)
    # The scale rides on the [b, t, r] hidden; it is 0 for an example with no specialist.
    gain = jnp.where(known, jnp.asarray(self.scale, self.dtype), jnp.zeros((), self.dtype))
    hidden = product("btd,bdr->btr", x, a_rows) * gain[:, None, None]
    return product("btr,brf->btf", hidden, b_rows)

  def rows(self, task_ids):
    """([b] bank row of each example's task (0 when unknown), [b] whether it has one)."""
    table = jnp.asarray([task_id(name) for name in self.tasks], jnp.int32)  # [n]
    matches = task_ids.astype(jnp.int32)[:, None] == table[None, :]  # [b, n]
    return jnp.argmax(matches, axis=1), jnp.any(matches, axis=1)
