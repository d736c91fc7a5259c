"""The one hook every adapter attaches through: a frozen, bias-free DenseGeneral.

`AdaptedDense` computes the backbone projection `x W` exactly as a T5X
`DenseGeneral` does (same parameter name, `kernel`, same logical axes, so
checkpoints map one to one) and adds the residual of each adapter the model's
`AdapterPlan` attaches at its parameter path, in a child module named after the
plan's slot (`adapter`, `specialist_adapter`). Freezing is the trainer's business
(a regex over parameter paths): nothing here knows what is trainable.

The plan is read, not passed: a projection uses the `adapters` of the nearest
module, itself included, whose `adapters` is not None, walking up its parents
(`plan_of`; a lifted transform ends the walk, so `models.layer_stack` hands the
plan to the layers it scans or rematerialises).
The model's root holds the plan; a module that must stay plain (the ViT when
`ViTConfig.adapt` is off, PaLI's image projection, the logits) says
`adapters=NO_ADAPTERS` (or a property returning it), and nothing in between knows
about adapters at all.

Adapters see the tokens flattened to `[batch, length, d_in]` and produce
`[batch, length, d_out]`; multi-axis projections (attention's
`[heads, head_dim]`) are reshaped around them, and their joined axis is named
`joined_kv` in the adapter's logical axes.
"""
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_smola.nn.adapter_plan import NO_ADAPTERS, AdapterPlan
from omni_smola.nn.adapter_spec import AdapterSpec
from omni_smola.nn.lora import LoRA
from omni_smola.nn.mixlora import MixLoRA
from omni_smola.nn.mole import MoLE
from omni_smola.nn.omni_smola import OmniSMoLA, fuses_input_projection
from omni_smola.nn.stored_param import stored_param
from omni_smola.nn.task_lora import TaskLoRA
from omni_smola.nn.token_context import TokenContext


def _normalize_axes(axes, ndim):
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted(a % ndim for a in axes))


def _joined_axis_name(names: Sequence[str]) -> str:
  """Logical name of several kernel axes seen as one adapter axis."""
  if len(names) == 1:
    return names[0]
  if set(names) == {"heads", "kv"}:
    return "joined_kv"
  raise ValueError(f"cannot name the joined adapter axis of kernel axes {tuple(names)}")


def build_adapter(spec: AdapterSpec, in_features: int, out_features: int, in_axis: str,
                  out_axis: str, dtype, param_dtype, name: str = "adapter") -> nn.Module:
  """The adapter module a spec names, for one projection's widths."""
  shared = dict(in_features=in_features, out_features=out_features, in_axis=in_axis,
                out_axis=out_axis, dtype=dtype, param_dtype=param_dtype, name=name)
  if spec.kind == "lora":
    return LoRA(spec.rank, spec.scale, **shared)
  if spec.kind == "smola":  # Omni-SMoLA's `mm` block alone.
    return OmniSMoLA({"mm": spec.num_experts}, spec.slots_per_expert, spec.rank,
                     spec.scale, routing=spec.routing, **shared)
  if spec.kind == "omni_smola":
    return OmniSMoLA(spec.experts_per_group, spec.slots_per_expert, spec.rank, spec.scale,
                     routing=spec.routing, **shared)
  if spec.kind == "mixlora":
    return MixLoRA(spec.num_factors, spec.rank, spec.scale, **shared)
  if spec.kind == "mole":
    return MoLE(spec.num_experts, spec.top_k, spec.rank, spec.scale,
                level=spec.mole_level, **shared)
  if spec.kind == "task_lora":
    return TaskLoRA(spec.tasks, spec.rank, spec.scale, **shared)
  raise ValueError(f"AdapterSpec.kind={spec.kind!r} adds no residual")


def plan_of(module: nn.Module) -> AdapterPlan:
  """The `adapters` of the nearest module (`module`, then its parents) that has one.

  A lifted transform (`nn.scan`, `nn.remat`) gives the modules it wraps a scope, not a
  module, as parent; whoever lifts a module hands it the plan read here on the outside
  (`models.layer_stack`).
  """
  while isinstance(module, nn.Module):
    plan = getattr(module, "adapters", None)
    if plan is not None:
      return plan
    module = module.parent
  return NO_ADAPTERS


class AdaptedDense(nn.Module):
  """DenseGeneral without bias, plus the residual of `adapter` where it applies.

  Attributes:
    features: output shape (int or tuple), as DenseGeneral.
    axis: input axes contracted, as DenseGeneral.
    kernel_axes: logical names of the kernel's axes (input axes, then output).
    adapters: this projection's own plan; None (the default) reads the plan of the
      enclosing modules (`plan`). A slot's spec whose `sites` do not match this
      projection's parameter path (`text/encoder/layers_0/mlp/wi_0`) adds nothing.
  """
  features: Union[int, Tuple[int, ...]]
  axis: Union[int, Tuple[int, ...]] = -1
  kernel_axes: Tuple[str, ...] = ()
  adapters: Optional[AdapterPlan] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
  precision: Any = None

  @nn.compact
  def __call__(self, inputs, context: Optional[TokenContext] = None):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = _normalize_axes(self.axis, inputs.ndim)
    in_shape = tuple(inputs.shape[a] for a in axis)
    if self.kernel_axes and len(self.kernel_axes) != len(axis) + len(features):
      raise ValueError(
          f"{self.path_name}: kernel_axes {self.kernel_axes} do not match "
          f"{len(axis)} input and {len(features)} output axes")
    kernel_init = self.kernel_init
    if self.kernel_axes:
      kernel_init = nn.with_logical_partitioning(kernel_init, self.kernel_axes)
    kernel = stored_param(self, "kernel", kernel_init, in_shape + features, self.param_dtype)
    kernel = jnp.asarray(kernel, self.dtype)
    inputs = jnp.asarray(inputs, self.dtype)
    slots = self.plan.residual_slots(self.path_name)
    if slots and fuses_input_projection(slots[0][1], context or TokenContext()):
      # The first slot's adapter computes `x W` with its own input products (one read
      # of x: `OmniSMoLA`, input fusion); later slots add their residuals as usual.
      (slot, spec), slots = slots[0], slots[1:]
      outputs = self._adapter_residual(spec, slot, inputs, axis, in_shape, features,
                                       context, kernel=kernel)
    else:
      contract = (axis, tuple(range(len(axis))))
      outputs = jax.lax.dot_general(inputs, kernel, (contract, ((), ())),
                                    precision=self.precision)
    for slot, spec in slots:
      outputs = outputs + self._adapter_residual(
          spec, slot, inputs, axis, in_shape, features, context)
    return outputs

  @property
  def path_name(self) -> str:
    """The parameter path of this projection: what `AdapterSpec.sites` match."""
    return "/".join(self.scope.path)

  @property
  def plan(self) -> AdapterPlan:
    return plan_of(self)

  def _adapter_residual(self, spec, name, inputs, axis, in_shape, features, context,
                        kernel=None):
    """The adapter's residual [b, t, *features]; with `kernel`, `x W` plus it."""
    leading = [a for a in range(inputs.ndim) if a not in axis]
    if leading != [0, 1] or axis != tuple(range(2, inputs.ndim)):
      raise ValueError(
          f"{self.path_name}: adapters need inputs [batch, length, *contracted], got "
          f"shape {inputs.shape} contracting axes {axis}")
    batch, length = inputs.shape[:2]
    context = context if context is not None else TokenContext()
    context.check_shapes(batch, length, where=self.path_name)
    names = self.kernel_axes or ("embed",) * len(axis) + ("mlp",) * len(features)
    adapter = build_adapter(
        spec, int(np.prod(in_shape)), int(np.prod(features)),
        in_axis=_joined_axis_name(names[:len(axis)]),
        out_axis=_joined_axis_name(names[len(axis):]),
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    flat_inputs = inputs.reshape(batch, length, -1)
    if kernel is None:
      residual = adapter(flat_inputs, context)
    else:
      residual = adapter(flat_inputs, context, kernel.reshape(flat_inputs.shape[-1], -1),
                         self.precision)
    return residual.reshape((batch, length) + features)
