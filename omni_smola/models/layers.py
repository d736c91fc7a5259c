"""Small building blocks shared by the towers: RMSNorm, token embedding, biased hook.

Logical axes name every parameter (`embed`, `vocab`, `mlp`, ...) so one rule table
(`omni_smola.partitioning`) shards them all.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_smola.nn import AdaptedDense, TokenContext
from omni_smola.nn.stored_param import stored_param

# Activations at every block boundary: the rule table decides their sharding.
ACTIVATION_AXES = ("batch", "length", "embed")


def constrain(x, axes=ACTIVATION_AXES):
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """T5's LayerNorm: scale only, no mean subtraction, statistics in float32."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = stored_param(self, "scale", nn.with_logical_partitioning(
        nn.initializers.ones, ("embed",)), (x.shape[-1],), jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.epsilon)
    return jnp.asarray(x * scale, self.dtype)


class Embed(nn.Module):
  """Token embedding `embedding: [vocab, embed]`; `attend` is its transpose (tied logits)."""
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32

  def setup(self):
    # T5 embeds with unit variance and never rescales the embedded tokens.
    self.embedding = stored_param(
        self, "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids):
    return jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)

  def attend(self, x):
    """x [b, l, embed] -> logits [b, l, vocab], in x's dtype (the decoder passes float32)."""
    return jnp.einsum("bld,vd->blv", x, jnp.asarray(self.embedding, x.dtype))


class BiasedAdaptedDense(AdaptedDense):
  """`AdaptedDense` plus a bias `bias` (ViT projections keep big_vision's biases).

  The bias is added after the adapter residual; it is a frozen backbone
  parameter like the kernel.
  """
  bias_axes: Optional[tuple] = None

  @nn.compact
  def __call__(self, inputs, context: Optional[TokenContext] = None):
    outputs = super().__call__(inputs, context)
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axes = self.bias_axes or self.kernel_axes[-len(features):]
    bias = stored_param(self, "bias", nn.with_logical_partitioning(nn.initializers.zeros, axes),
                        features, self.param_dtype)
    return outputs + jnp.asarray(bias, self.dtype)
