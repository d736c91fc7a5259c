"""Multi-head dot-product attention whose four projections go through the adapter hook.

One module serves both towers:
* T5 (`init_style='t5'`): no biases and no `1/sqrt(head_dim)` on the logits: T5
  folds that factor into the query initialisation, and checkpoints rely on it.
* ViT (`init_style='vit'`): biases and the usual query scaling (big_vision).

Letters: b batch, q query position, k key position, h head, d head dim.
Projection kernels: query/key/value `[embed, heads, kv]`, out `[heads, kv, embed]`.

Cached decoding (`decode=True`), flax `cache` collection:
* self-attention keeps `cached_key`/`cached_value` `[b, length, h, d]` and
  writes the new position's key and value at `decode_position`;
* cross-attention (`cache_inputs_kv=True`) projects the encoder output once,
  on the cache-initialising call, into its own collection `CROSS_ATTENTION_KV`
  (`cached_key`/`cached_value`), and reuses it: a decoding loop passes that
  collection as a constant and carries only `cache` from step to step.
The first call in decode mode (the cache does not exist yet) only creates the
cache and computes as without it.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_smola.models.layers import BiasedAdaptedDense
from omni_smola.nn import AdaptedDense, TokenContext

# Masked logits: exp() of this underflows to exactly 0 in float32 (no NaN from -inf).
MASKED_LOGIT = -1e10
CROSS_ATTENTION_KV = "cross_attention_kv"  # the decoding-time keys/values of the encoder


def _inits(style: str, head_dim: int):
  """(query, key/value, out) kernel initialisers; fans over the right axes."""
  if style == "t5":
    # T5X: fan-in normal, the query's variance divided by head_dim (the logit scaling).
    heads_out = dict(mode="fan_in", distribution="normal", in_axis=0, out_axis=(1, 2))
    return (nn.initializers.variance_scaling(1.0 / head_dim, **heads_out),
            nn.initializers.variance_scaling(1.0, **heads_out),
            nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1),
                                             out_axis=2))
  heads_out = dict(mode="fan_avg", distribution="uniform", in_axis=0, out_axis=(1, 2))
  qkv = nn.initializers.variance_scaling(1.0, **heads_out)
  return qkv, qkv, nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                     in_axis=(0, 1), out_axis=2)


class MultiHeadAttention(nn.Module):
  """Attention from `inputs_q` to `inputs_kv`.

  Attributes:
    decode: use and update the KV cache (see module docstring).
    cache_inputs_kv: with `decode`, cache the projected `inputs_kv` once
      (cross-attention) instead of appending one position per call.
  """
  num_heads: int
  head_dim: int
  init_style: str = "t5"
  dropout_rate: float = 0.0
  deterministic: bool = True
  decode: bool = False
  cache_inputs_kv: bool = False
  dtype: Any = jnp.float32

  def _projection(self, name, features, axis, kernel_axes, init):
    cls = AdaptedDense if self.init_style == "t5" else BiasedAdaptedDense
    return cls(features=features, axis=axis, kernel_axes=kernel_axes, dtype=self.dtype,
               kernel_init=init, name=name)

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, context_q: TokenContext,
               context_kv: TokenContext, mask=None, bias=None, decode_position=None):
    """inputs [b, q|k, embed]; mask [b|1, 1|h, q, k] bool; bias [b|1, h, q, k] float32.

    Returns [b, q, embed]. `decode_position`: the (traced) position of the single
    query when decoding self-attention with the cache.
    """
    query_init, kv_init, out_init = _inits(self.init_style, self.head_dim)
    heads = (self.num_heads, self.head_dim)
    heads_axes = ("embed", "heads", "kv")
    query = self._projection("query", heads, -1, heads_axes, query_init)(inputs_q, context_q)
    if self.init_style != "t5":
      query = query * jnp.asarray(self.head_dim ** -0.5, self.dtype)
    key, value = self._keys_and_values(inputs_kv, context_kv, heads, heads_axes, kv_init,
                                       decode_position)
    query = nn.with_logical_constraint(query, ("batch", "length", "heads", "kv"))

    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
    if bias is not None:
      logits = logits + bias
    if mask is not None:
      logits = jnp.where(mask, logits, MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=self.deterministic)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    out = self._projection("out", inputs_q.shape[-1], (-2, -1), ("heads", "kv", "embed"),
                           out_init)
    return out(mixed, context_q)

  def _keys_and_values(self, inputs_kv, context_kv, heads, heads_axes, init,
                       decode_position):
    def project():
      key = self._projection("key", heads, -1, heads_axes, init)(inputs_kv, context_kv)
      value = self._projection("value", heads, -1, heads_axes, init)(inputs_kv, context_kv)
      return key, value

    if not self.decode:
      return project()
    if self.cache_inputs_kv:
      if self.has_variable(CROSS_ATTENTION_KV, "cached_key"):  # the encoder side is fixed
        return (self.get_variable(CROSS_ATTENTION_KV, "cached_key"),
                self.get_variable(CROSS_ATTENTION_KV, "cached_value"))
      key, value = project()
      self.put_variable(CROSS_ATTENTION_KV, "cached_key", key)
      self.put_variable(CROSS_ATTENTION_KV, "cached_value", value)
      return key, value
    initialized = self.has_variable("cache", "cached_key")
    key, value = project()
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    if not initialized:
      return key, value
    if key.shape[1] != 1:
      raise ValueError(f"{'/'.join(self.scope.path)}: cached decoding takes one position "
                       "per call, "
                       f"got {key.shape[1]}")
    start = (0, decode_position, 0, 0)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
    return cached_key.value, cached_value.value
