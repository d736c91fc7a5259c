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
