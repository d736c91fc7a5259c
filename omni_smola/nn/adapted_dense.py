"""The one hook every adapter attaches through: a frozen, bias-free DenseGeneral.

`AdaptedDense` computes the backbone projection `x W` exactly as a T5X
`DenseGeneral` does (same parameter name, `kernel`, same logical axes, so
checkpoints map one to one) and adds the residual of the adapter its spec names,
in a child module called `adapter`. Freezing is the trainer's business (a regex
over parameter paths): nothing here knows what is trainable.

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

from omni_smola.nn.adapter_spec import AdapterSpec
from omni_smola.nn.lora import LoRA
from omni_smola.nn.mixlora import MixLoRA
from omni_smola.nn.mole import MoLE
from omni_smola.nn.omni_smola import OmniSMoLA
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
  raise ValueError(f"AdapterSpec.kind={spec.kind!r} adds no residual")


class AdaptedDense(nn.Module):
  """DenseGeneral without bias, plus the residual of `adapter` where it applies.

  Attributes:
    features: output shape (int or tuple), as DenseGeneral.
    axis: input axes contracted, as DenseGeneral.
    kernel_axes: logical names of the kernel's axes (input axes, then output).
    adapter: the spec; None or a spec whose `sites` do not match this projection's
      parameter path (`text/encoder/layers_0/mlp/wi_0`) gives a plain projection.
    specialist_adapter: a second adapter added on top, in a child called
      `specialist_adapter` (the paper's generalist -> specialist recipe: the
      generalist's adapter is frozen and a per-task LoRA is trained).
  """
  features: Union[int, Tuple[int, ...]]
  axis: Union[int, Tuple[int, ...]] = -1
  kernel_axes: Tuple[str, ...] = ()
  adapter: Optional[AdapterSpec] = None
  specialist_adapter: Optional[AdapterSpec] = None
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
    kernel = self.param("kernel", kernel_init, in_shape + features, self.param_dtype)
    kernel = jnp.asarray(kernel, self.dtype)
    inputs = jnp.asarray(inputs, self.dtype)
    contract = (axis, tuple(range(len(axis))))
    outputs = jax.lax.dot_general(inputs, kernel, (contract, ((), ())),
                                  precision=self.precision)
    for name, spec in (("adapter", self.adapter),
                       ("specialist_adapter", self.specialist_adapter)):
      if spec is not None and spec.applies_to(self.path_name):
        outputs = outputs + self._adapter_residual(
            spec, name, inputs, axis, in_shape, features, context)
    return outputs

  @property
  def path_name(self) -> str:
    """The parameter path of this projection: what `AdapterSpec.sites` match."""
    return "/".join(self.scope.path)

  def _adapter_residual(self, spec, name, inputs, axis, in_shape, features, context):
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
    residual = adapter(flat_inputs, context)
    return residual.reshape((batch, length) + features)
