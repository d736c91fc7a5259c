"""LoRA (Hu et al., 2021): one low-rank residual `(alpha / r) x A B`, B starting at zero."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from omni_smola.nn import initializers
from omni_smola.nn.products import product


class LoRA(nn.Module):
  rank: int
  scale: float
  in_features: int
  out_features: int
  in_axis: str = "embed"
  out_axis: str = "mlp"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    """x: [b, t, d] -> [b, t, f]."""
    a = self.param("lora_a", nn.with_logical_partitioning(
        initializers.down_projection, (self.in_axis, "lora_rank")),
                   (self.in_features, self.rank), self.param_dtype)
    b = self.param("lora_b", nn.with_logical_partitioning(
        initializers.up_projection, ("lora_rank", self.out_axis)),
                   (self.rank, self.out_features), self.param_dtype)
    hidden = product("btd,dr->btr", x, jnp.asarray(a, self.dtype)) * jnp.asarray(self.scale, self.dtype)
    return product("btr,rf->btf", hidden, jnp.asarray(b, self.dtype))  # the scale rides on the [b, t, r] hidden
