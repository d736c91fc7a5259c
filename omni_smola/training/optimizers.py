"""Optimizers and learning-rate schedules, composed from optax and configured by gin.

    train.optimizer = @create_optimizer()
    create_optimizer.name = 'adafactor'          # t5x's default; or 'adamw'
    create_optimizer.learning_rate = @learning_rate_schedule()
    learning_rate_schedule.kind = 'rsqrt'        # or 'cosine', 'constant'
    learning_rate_schedule.peak_value = 1e-2
    learning_rate_schedule.warmup_steps = 1000

The optimizer only ever sees the trainable parameters (see `param_split`), so its
state holds nothing for the frozen backbone.
"""
import dataclasses
from typing import Callable, NamedTuple, Optional, Union

import gin
import jax.numpy as jnp
import optax

from omni_smola.training import program_cache

OPTIMIZERS = ("adafactor", "adamw", "sgd")
SCHEDULES = ("constant", "rsqrt", "cosine", "linear")
Schedule = Callable[[jnp.ndarray], jnp.ndarray]


class Optimizer(NamedTuple):
  """The gradient transformation and the learning-rate schedule it follows (to log).

  `spec`: what it was built from (`program_cache.fingerprint`), None when that has no
  value identity (a schedule function of the user's own); train steps are shared only
  between optimizers of equal specs.
  """
  tx: optax.GradientTransformation
  learning_rate: Schedule
  spec: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class LearningRateSchedule:
  """`step -> learning rate`, a value: two equal schedules compare (and repr) equal, so
  runs that share one can share their compiled train step (`program_cache`)."""
  kind: str
  peak_value: float
  warmup_steps: int
  total_steps: Optional[int]
  final_fraction: float

  def __call__(self, step):
    step = jnp.asarray(step, jnp.float32)
    if self.kind == "constant":
      decay = 1.0
    elif self.kind == "rsqrt":
      floor = max(self.warmup_steps, 1)
      decay = jnp.sqrt(floor / jnp.maximum(step, floor))
    else:
      span = max(self.total_steps - self.warmup_steps, 1)
      progress = jnp.clip((step - self.warmup_steps) / span, 0.0, 1.0)
      shape = (0.5 * (1.0 + jnp.cos(jnp.pi * progress)) if self.kind == "cosine"
               else 1.0 - progress)
      decay = self.final_fraction + (1.0 - self.final_fraction) * shape
    warmup = (jnp.ones_like(step) if self.warmup_steps == 0
              else jnp.minimum(step / self.warmup_steps, 1.0))
    return self.peak_value * warmup * decay


@gin.configurable
def learning_rate_schedule(kind: str = "rsqrt", peak_value: float = 1e-2,
                           warmup_steps: int = 1000, total_steps: Optional[int] = None,
                           final_fraction: float = 0.0) -> LearningRateSchedule:
  """A schedule `step -> learning rate` with a linear warm-up from 0 to `peak_value`.

  kind:
    constant: `peak_value` after warm-up.
    rsqrt: `peak_value * sqrt(warmup_steps / step)` after warm-up (t5x's
      inverse square root decay; continuous at the end of warm-up).
    cosine: cosine decay to `final_fraction * peak_value` at `total_steps`.
    linear: linear decay to `final_fraction * peak_value` at `total_steps`.
  """
  if kind not in SCHEDULES:
    raise ValueError(f"learning_rate_schedule.kind={kind!r} is not one of {SCHEDULES}")
  if warmup_steps < 0:
    raise ValueError(f"learning_rate_schedule.warmup_steps must be >= 0, got {warmup_steps}")
  if kind in ("cosine", "linear") and not total_steps:
    raise ValueError(f"learning_rate_schedule.kind={kind!r} needs total_steps "
                     "(bind it to %TRAIN_STEPS)")
  if kind in ("constant", "rsqrt"):
    # Neither reads them: runs of different lengths then have equal schedules, and share
    # their train step (`program_cache`).
    total_steps, final_fraction = None, 0.0
  return LearningRateSchedule(kind, peak_value, warmup_steps, total_steps, final_fraction)


@gin.configurable
def create_optimizer(name: str = "adafactor",
                     learning_rate: Union[float, Schedule, None] = None,
                     clip_gradient_norm: Optional[float] = 1.0,
                     weight_decay: float = 0.0,
                     adafactor_decay_rate: float = 0.8,
                     adafactor_momentum: Optional[float] = None,
                     adafactor_multiply_by_parameter_scale: bool = False,
                     adam_b1: float = 0.9, adam_b2: float = 0.999, adam_eps: float = 1e-8,
                     ) -> Optimizer:
  """The optimizer of a run: clipping (global norm) then Adafactor / AdamW / SGD.

  `learning_rate` is a float or a schedule; None takes `learning_rate_schedule()`
  as gin configures it. `adafactor_multiply_by_parameter_scale` (t5x's default for
  full training, set by runs/pretrain.gin) scales each update by the parameter's
  RMS, floored at 1e-3: adapters' zero-initialised `B` factors would then move
  1000x slower than the learning rate says, so it is off by default.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"create_optimizer.name={name!r} is not one of {OPTIMIZERS}")
  if learning_rate is None:
    learning_rate = learning_rate_schedule()
  if name == "adafactor":
    core = optax.adafactor(
        learning_rate=learning_rate, decay_rate=adafactor_decay_rate,
        momentum=adafactor_momentum,
        multiply_by_parameter_scale=adafactor_multiply_by_parameter_scale,
        weight_decay_rate=weight_decay or None)
  elif name == "adamw":
    core = optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps,
                       weight_decay=weight_decay)
  else:
    core = optax.sgd(learning_rate)
  parts = [optax.clip_by_global_norm(clip_gradient_norm)] if clip_gradient_norm else []
  spec = program_cache.fingerprint(
      "create_optimizer", name, learning_rate, clip_gradient_norm, weight_decay,
      adafactor_decay_rate, adafactor_momentum, adafactor_multiply_by_parameter_scale,
      adam_b1, adam_b2, adam_eps)
  return Optimizer(optax.chain(*parts, core), _as_schedule(learning_rate), spec)


def _as_schedule(learning_rate: Union[float, Schedule]) -> Schedule:
  if callable(learning_rate):
    return learning_rate
  return lambda step: jnp.asarray(learning_rate, jnp.float32)
