"""Conditional Mixture of LoRA (MixLoRA, Shen et al., arXiv 2402.15896).

Instead of fixed `A: [d, r]`, `B: [r, f]`, each example assembles its own from
pools of `K` rank-1 factors, `a_k: [d]` and `b_k: [f]`:

* Independent factor selection (IFS): router A scores the pool from the
  example's features `z` and keeps the top r; router B does the same.
* Conditional factor selection (CFS): router B's scores also see which A
  factors were chosen, `logits_B = z W_B + s_A W_cond`, where `s_A: [K]` is the
  score-weighted multi-hot of the A selection, so B is chosen to fit A.

The j-th selected A factor pairs with the j-th selected B factor (both ordered
by score). Each pair is weighted by its factors' selection weights,
`w = r * softmax(selected logits)` (mean one, so a uniform router gives LoRA's
scale). That weighting is what gives the routers a gradient; a hard 0/1
selection would leave them untrained.

Routing is per example on `instance_routing.instance_features` (the prompt side
in a causal decoder). Cost: 2 t d r + 2 t r f per token, as LoRA, plus routing.
Letters: b batch, t token, k pool index, j selected rank index, d, f widths.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_smola.nn import routing_stats
from omni_smola.nn.instance_routing import instance_features
from omni_smola.nn.low_rank import LowRankAdapter
from omni_smola.nn.token_context import TokenContext


def select_factors(logits, rank):
  """[b, K] logits -> (indices [b, r], weights [b, r], score-weighted multi-hot [b, K])."""
  top_logits, top_index = jax.lax.top_k(logits, rank)
  weights = rank * jax.nn.softmax(top_logits, axis=-1)
  multi_hot = jnp.einsum("bj,bjk->bk", weights,
                         jax.nn.one_hot(top_index, logits.shape[-1], dtype=weights.dtype))
  return top_index, weights, multi_hot


class MixLoRA(LowRankAdapter):
  num_factors: int
  rank: int
  scale: float

  def _router(self, name, shape_in):
    return nn.DenseGeneral(
        self.num_factors, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
            (shape_in, "expert")),
        name=name)

  @nn.compact
  def __call__(self, x, context: TokenContext):
    # Pools of rank-1 factors, a_k [d] and b_k [f]: no rank axis.
    factors_a, factors_b = self.factors(("factors_a", "factors_b"), None,
                                        stacked=((self.num_factors, "expert"),))
    features = instance_features(x, context, where="mixlora")  # [b, d_ctx]
    index_a, weights_a, selection_a = select_factors(
        self._router("router_a", "embed")(features), self.rank)
    logits_b = self._router("router_b", "embed")(features)
    logits_b = logits_b + self._router("router_conditional", None)(selection_a)
    index_b, weights_b, _ = select_factors(logits_b, self.rank)

    chosen_a = jnp.asarray(factors_a, self.dtype)[index_a]  # [b, j, d]
    chosen_b = jnp.asarray(factors_b, self.dtype)[index_b]  # [b, j, f]
    pair_weights = (weights_a * weights_b * self.scale).astype(self.dtype)  # [b, j]
    valid = context.valid_mask(*x.shape[:2])
    # Weights and the padding mask ride on the [b, t, r] hidden, not the output.
    hidden = (jnp.einsum("btd,bjd->btj", x, chosen_a) * pair_weights[:, None, :]
              * valid[..., None].astype(self.dtype))
    if routing_stats.wants_stats(self):
      factor_weights = selection_a / self.rank  # [b, K], sums to one
      routing_stats.sow_expert_weights(
          self, jnp.broadcast_to(factor_weights[:, None, :],
                                 x.shape[:2] + (self.num_factors,)), valid)
    return jnp.einsum("btj,bjf->btf", hidden, chosen_b)
