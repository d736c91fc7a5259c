"""Training metrics: summed on the host, written as TensorBoard scalars and one console line.

The train step returns sums (`loss`, `accuracy`, `num_tokens`, ...; see
`PaliModel.loss_fn`), so averages over a logging window are exact whatever the
batches' padding: loss per token = sum(loss) / sum(num_tokens).

TensorBoard event files go to `MODEL_DIR/train` (and `MODEL_DIR/eval` for
evaluation) through clu's metric writers; only the first process writes.
"""
import collections
import os
import time
from typing import Callable, Dict, Mapping, Optional

from absl import logging
import jax
import numpy as np

try:
  from clu import metric_writers  # needs the tensorboard package
except ImportError as error:  # pragma: no cover - depends on the environment
  metric_writers = None
  _CLU_IMPORT_ERROR = error

_SUMMED = ("loss", "z_loss", "accuracy", "num_tokens", "num_examples", "nonfinite")


class _NullWriter:
  """Stands in for a clu writer where none can or should write."""

  def write_scalars(self, step, scalars):
    del step, scalars

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(model_dir: str, collection: str):
  """An asynchronous TensorBoard writer (a no-op on processes other than the first)."""
  if jax.process_index() != 0:
    return _NullWriter()
  if metric_writers is None:
    logging.warning("No TensorBoard event files (clu's writers need the tensorboard "
                    "package: %s); metrics go to the console only", _CLU_IMPORT_ERROR)
    return _NullWriter()
  return metric_writers.AsyncWriter(
      metric_writers.SummaryWriter(os.path.join(model_dir, collection)))


def format_duration(seconds: float) -> str:
  seconds = max(int(seconds), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class TrainMetricsLogger:
  """Accumulates per-step metric sums; `write` logs a window's averages and rates.

  `counters`, when given, returns run-long counts (e.g. `skipped_examples`, the
  examples the input pipeline dropped) written with every window's scalars.
  """

  def __init__(self, model_dir: str, total_steps: int, batch_size: int,
               writer=None, counters: Optional[Callable[[], Mapping[str, float]]] = None):
    self.writer = writer if writer is not None else create_writer(model_dir, "train")
    self.counters = counters
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._sums: Dict[str, float] = collections.defaultdict(float)
    self._last: Dict[str, float] = {}
    self._steps = 0
    self._window_start = time.perf_counter()
    self.history = []  # (step, loss per token), for callers and tests

  def add(self, metrics: Mapping[str, np.ndarray]) -> None:
    for name, value in metrics.items():
      if name in _SUMMED:
        self._sums[name] += float(value)
      else:
        self._last[name] = float(value)
    self._steps += 1

  def reset_clock(self) -> None:
    """Restarts the timing window (after compilation or an evaluation)."""
    self._window_start = time.perf_counter()

  def write(self, step: int) -> Dict[str, float]:
    if not self._steps:
      return {}
    elapsed = max(time.perf_counter() - self._window_start, 1e-9)
    tokens = max(self._sums["num_tokens"], 1.0)
    steps_per_second = self._steps / elapsed
    scalars = {
        "loss": self._sums["loss"] / tokens,
        "z_loss": self._sums["z_loss"] / tokens,
        "accuracy": self._sums["accuracy"] / tokens,
        "learning_rate": self._last.get("learning_rate", float("nan")),
        "grad_norm": self._last.get("grad_norm", float("nan")),
        "steps_per_second": steps_per_second,
        "examples_per_second": steps_per_second * self.batch_size,
        "nonfinite_steps": self._sums["nonfinite"],
    }
    if self.counters is not None:
      scalars.update(self.counters())
    self.writer.write_scalars(step, scalars)
    eta = (self.total_steps - step) / steps_per_second
    logging.info(
        "step %d/%d  loss %.4f  accuracy %.2f%%  lr %.3g  |  %.2f steps/s  %.1f examples/s"
        "  |  ETA %s", step, self.total_steps, scalars["loss"], 100 * scalars["accuracy"],
        scalars["learning_rate"], steps_per_second, scalars["examples_per_second"],
        format_duration(eta))
    if scalars.get("skipped_examples"):
      logging.warning("step %d: %d examples skipped so far (unreadable images): %s", step,
                      scalars["skipped_examples"],
                      {k.split("/", 1)[1]: int(v) for k, v in scalars.items()
                       if k.startswith("skipped_examples/")})
    self.history.append((step, scalars["loss"]))
    self._sums.clear()
    self._steps = 0
    self.reset_clock()
    return scalars

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()
