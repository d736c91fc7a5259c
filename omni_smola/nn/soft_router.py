"""Soft MoE slot parameters, with the normalisation that keeps logits sane at width.

Soft MoE (Puigcerver et al., 2023) l2-normalises both the tokens and the slot
parameters and multiplies by one learned scalar: without it, logits grow with
the model width and the softmaxes collapse to one-hot early in training. The
router math runs in float32 whatever the activation dtype.
"""
import flax.linen as nn
import jax.numpy as jnp

from omni_smola.nn import initializers
from omni_smola.nn.stored_param import stored_param


def l2_normalize(x, axis, eps=1e-6):
  return x * jnp.reciprocal(jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps))


def inverse_token_norm(x):
  """1 / |x| per token, float32: [b, t, d] -> [b, t].

  Multiplying the logits by it equals normalising x first, without writing a
  normalised copy of the [b, t, d] activations.
  """
  x = x.astype(jnp.float32)
  return jnp.reciprocal(jnp.sqrt(jnp.sum(x * x, axis=-1) + 1e-6))


class SoftRouter(nn.Module):
  """Slot parameters `phi: [d, e, p]` and a learned scale."""
  num_experts: int
  slots_per_expert: int
  in_features: int
  in_axis: str = "embed"

  def setup(self):
    self.slot_params = stored_param(
        self, "slot_params",
        nn.with_logical_partitioning(initializers.router_weights,
                                     (self.in_axis, "expert", "slots")),
        (self.in_features, self.num_experts, self.slots_per_expert), jnp.float32)
    self.scale = stored_param(self, "scale", nn.with_logical_partitioning(
        nn.initializers.ones, ()), (), jnp.float32)

  def scaled_unit_slots(self):
    """scale * phi / |phi|, flattened expert-major: [d, e * p] float32."""
    unit = l2_normalize(jnp.asarray(self.slot_params, jnp.float32), axis=0)
    return (self.scale * unit).reshape(self.in_features, -1)

  def __call__(self, x):
    """logits[b, t, e, p] = scale * <x_bt / |x_bt|, phi_ep / |phi_ep|>."""
    logits = jnp.einsum("btd,ds->bts", x.astype(jnp.float32), self.scaled_unit_slots())
    logits = logits * inverse_token_norm(x)[..., None]
    return logits.reshape(x.shape[:2] + (self.num_experts, self.slots_per_expert))
