"""What a run does when things go wrong: preemption (SIGTERM) and non-finite losses.

Preemption: TPU VMs get SIGTERM shortly before they are taken away. The trainer
asks `PreemptionWatcher.reached(step)` after every step; once it says yes, the
run saves a checkpoint and exits with status 0, and the next launch resumes. With
several processes, JAX's preemption sync point (set up by
`jax.distributed.initialize`) makes every host stop at the same step; a single
process catches SIGTERM itself.

Non-finite loss: by default the run stops with `NonFiniteLossError`, naming the
step, before any checkpoint of the diverged parameters is written; the train step
can instead skip such updates (`train.on_nonfinite_loss = 'skip'`).
"""
import signal
import threading
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN or infinite."""


class PreemptionWatcher:
  """A context manager that notices SIGTERM; `reached(step)` is the question to ask."""

  def __init__(self):
    self._signalled = threading.Event()
    self._said = False
    self._previous = None
    self._installed = False

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True
    return self

  def __exit__(self, *exc):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
      self._installed = False
    return False

  def _on_sigterm(self, signum, frame):
    # Only the flag: the handler runs between any two bytecodes, and logging here could
    # re-enter a log stream in the middle of a write. `reached` says it.
    del signum, frame
    self._signalled.set()

  def request(self) -> None:
    """Asks for a stop, as SIGTERM would (for tests and callers)."""
    self._signalled.set()

  def reached(self, step: int) -> bool:
    if self._signalled.is_set():
      if not self._said:
        logging.warning("SIGTERM received: saving a checkpoint at step %d", step)
        self._said = True
      return True
    if jax.process_count() > 1:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # no preemption service (jax.distributed not initialised)
        return False
    return False


def nonfinite_message(step: int, loss: float, last_checkpoint: Optional[int],
                      checkpoint_dir: str) -> str:
  where = (f"the last good checkpoint is step {last_checkpoint} in {checkpoint_dir}"
           if last_checkpoint is not None else "no checkpoint was written yet")
  return (f"non-finite loss ({loss}) at step {step}: stopping the run; {where}. Lower the "
          "learning rate, or set `train.on_nonfinite_loss = 'skip'` to skip such updates.")
