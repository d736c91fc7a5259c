"""LoRA (Hu et al., 2021): one low-rank residual `(alpha / r) x A B`, B starting at zero."""
import flax.linen as nn
import jax.numpy as jnp

from omni_smola.nn.low_rank import LowRankAdapter
from omni_smola.nn.products import product


class LoRA(LowRankAdapter):
  rank: int
  scale: float

  @nn.compact
  def __call__(self, x, context=None):
    """x: [b, t, d] -> [b, t, f]."""
    a, b = self.factors(("lora_a", "lora_b"), self.rank)
    hidden = product("btd,dr->btr", x, jnp.asarray(a, self.dtype)) * jnp.asarray(self.scale, self.dtype)
    return product("btr,rf->btf", hidden, jnp.asarray(b, self.dtype))  # the scale rides on the [b, t, r] hidden
