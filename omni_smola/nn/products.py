"""Two-operand einsums whose gradients are einsums over the same operands.

JAX transposes a product for its gradient by swapping operands inside
`dot_general` and then permuting the result: the gradient of `x @ w` with
respect to `w` becomes `dot(g, x)` followed by a transpose. XLA:CPU serves
that form by first writing the large cotangent `g: [tokens, f]` out transposed,
a full extra pass over the activations for every adapter product, which costs
more than the products of LoRA and token-routed SMoLA themselves. Here each
gradient is one einsum over the original operands in their order
(`einsum('btk,btf->kf', h, g)` for the example), which XLA:CPU serves by
rearranging the narrow operand (rank, slots or stacked experts wide) and reading
the activations in place. On GPU and TPU either form is one GEMM.

    product("btd,dk->btk", x, w)   # == jnp.einsum, same forward
"""
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def product(spec: str, lhs, rhs):
  return jnp.einsum(spec, lhs, rhs)


def _forward(spec, lhs, rhs):
  return jnp.einsum(spec, lhs, rhs), (lhs, rhs)


def _backward(spec, residuals, cotangent):
  lhs, rhs = residuals
  inputs, out = spec.split("->")
  lhs_spec, rhs_spec = inputs.split(",")
  lhs_grad = jnp.einsum(f"{out},{rhs_spec}->{lhs_spec}", cotangent, rhs)
  rhs_grad = jnp.einsum(f"{lhs_spec},{out}->{rhs_spec}", lhs, cotangent)
  return lhs_grad.astype(lhs.dtype), rhs_grad.astype(rhs.dtype)


product.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def joint_product(spec: str, lhs, rhs_parts, precision=None):
  """`[product(spec, lhs, r) for r in rhs_parts]` as ONE product against the parts joined
  on their last axis: the large `lhs` is read once instead of once per part.

  rhs_parts: a tuple of `[..., k_i]` arrays that differ only in the last axis. Outputs
  are float32 (the joint product accumulates and returns in float32, so a router's
  logits keep their precision when the activations are bfloat16). The gradient treats
  the parts one by one, as `product` does: a part whose gradient nobody uses (a frozen
  kernel) is not computed at all once jitted, which the gradient of a joined operand,
  one `[d, sum k_i]` matmul, would not allow.
  """
  return _joint_forward(spec, lhs, rhs_parts, precision)[0]


def _joint_forward(spec, lhs, rhs_parts, precision):
  widths = [part.shape[-1] for part in rhs_parts]
  joined = jnp.concatenate([part.astype(lhs.dtype) for part in rhs_parts], axis=-1)
  out = jnp.einsum(spec, lhs, joined, precision=precision,
                   preferred_element_type=jnp.float32)
  offsets = [sum(widths[:i]) for i in range(len(widths) + 1)]
  return tuple(out[..., offsets[i]:offsets[i + 1]] for i in range(len(widths))), (lhs, rhs_parts)


def _joint_backward(spec, precision, residuals, cotangents):
  lhs, rhs_parts = residuals
  inputs, out = spec.split("->")
  lhs_spec, rhs_spec = inputs.split(",")
  lhs_grad = sum(jnp.einsum(f"{out},{rhs_spec}->{lhs_spec}", g.astype(lhs.dtype),
                            part.astype(lhs.dtype), precision=precision)
                 for g, part in zip(cotangents, rhs_parts))
  rhs_grads = tuple(jnp.einsum(f"{lhs_spec},{out}->{rhs_spec}", lhs, g.astype(lhs.dtype),
                               precision=precision).astype(part.dtype)
                    for g, part in zip(cotangents, rhs_parts))
  return lhs_grad.astype(lhs.dtype), rhs_grads


joint_product.defvjp(_joint_forward, _joint_backward)
