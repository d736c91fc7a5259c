"""MoLE: sparse top-k gated LoRA experts (the language experts of MoME).

Gates are a softmax over the k best router logits (renormalised over the chosen
k, zero elsewhere), per token or per example. The experts are evaluated with the
same `LowRankExperts.mix_per_token` as token-routed SMoLA: for the few experts
these models use, computing all of them and multiplying by sparse gates is
faster on TPU than gathering per-token expert weights (which would build a
`[tokens, d, r]` tensor); the FLOPs are those of `num_experts` experts.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_smola.nn import routing_stats
from omni_smola.nn.instance_routing import instance_features
from omni_smola.nn.low_rank import LowRankAdapter
from omni_smola.nn.low_rank_experts import LowRankExperts
from omni_smola.nn.token_context import TokenContext


def top_k_gates(logits, k):
  """[..., e] logits -> [..., e] gates: softmax over the top k, zero elsewhere."""
  top_logits, top_index = jax.lax.top_k(logits, k)
  top_weights = jax.nn.softmax(top_logits, axis=-1)
  one_hot = jax.nn.one_hot(top_index, logits.shape[-1], dtype=logits.dtype)
  # A selection of k (static, small) one-hot rows: elementwise, not a product.
  return sum(top_weights[..., i, None] * one_hot[..., i, :] for i in range(k))


class MoLE(LowRankAdapter):
  num_experts: int
  top_k: int
  rank: int
  scale: float
  level: str = "token"

  @nn.compact
  def __call__(self, x, context: TokenContext):
    batch, length = x.shape[:2]
    valid = context.valid_mask(batch, length)
    if self.level == "instance":
      features = instance_features(x, context, where="mole")  # [b, d_ctx]
    else:
      features = x.astype(jnp.float32)  # [b, t, d]
    router = nn.DenseGeneral(
        self.num_experts, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
            (self.in_axis if self.level == "token" else "embed", "expert")),
        name="router")
    gates = top_k_gates(router(features), self.top_k)
    if self.level == "instance":
      gates = jnp.broadcast_to(gates[:, None, :], (batch, length, self.num_experts))
    gates = gates * valid[..., None]
    experts = LowRankExperts(self.num_experts, self.rank, **self.projection_fields(),
                             name="experts")
    if routing_stats.wants_stats(self):
      routing_stats.sow_expert_weights(self, gates, valid)
    return experts.mix_per_token(x, gates * self.scale)  # scale rides on the gates
