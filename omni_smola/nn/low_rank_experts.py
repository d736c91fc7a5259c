"""A stack of low-rank experts `f_e(x) = x A_e B_e`, applied without per-token weights.

Letters: b batch, t token, e expert, n slot vectors per expert, r rank,
d input width, f output width. `A: [e, d, r]`, `B: [e, r, f]`. The applications
contract in the order that makes the FLOPs equal the analytic count and never
build a `[tokens, d, f]` weight or a `[tokens, e, f]` output:

* `mix_per_token`: `sum_e g[b,t,e] x A_e B_e` as `(x A_all) * g` followed by one
  matmul over the joined `(e, r)` axis: 2 t d e r + 2 t e r f FLOPs.
* `per_slot`: Soft MoE slots, each one vector: 2 b e n (d r + r f). Slots come
  batch-major, `[b, e, n, d]`, the layout of the dispatch and combine matmuls
  around them; only these small slot arrays, never the token activations, get
  rearranged for the per-expert contractions.
"""
import jax.numpy as jnp

from omni_smola.nn.low_rank import LowRankAdapter
from omni_smola.nn.products import product


def mix_stacked(x, down, up, gates):
  """sum_e gates[b,t,e] x A_e B_e from stacked factors, as two matmuls.

  x: [b, t, d], down: [d, e * r] (all A side by side), up: [e * r, f],
  gates: [b, t, e] -> [b, t, f].
  """
  return mix_down_projected(product("btd,dk->btk", x, down), up, gates)


def mix_down_projected(hidden, up, gates):
  """The second half of `mix_stacked`, from `hidden = x A_all: [b, t, e * r]` computed
  elsewhere (in one product with the frozen kernel: `OmniSMoLA`'s input fusion)."""
  hidden = hidden.reshape(gates.shape + (-1,)) * gates[..., None]  # [b, t, e, r]
  return product("btk,kf->btf", hidden.reshape(gates.shape[:2] + (-1,)), up)


class LowRankExperts(LowRankAdapter):
  num_experts: int
  rank: int

  def setup(self):
    self.expert_a, self.expert_b = self.factors(
        ("expert_a", "expert_b"), self.rank, stacked=((self.num_experts, "expert"),))

  def stacked_down(self):
    """All experts' A side by side: [d, e * r]."""
    a = jnp.asarray(self.expert_a, self.dtype)
    return jnp.transpose(a, (1, 0, 2)).reshape(self.in_features, -1)

  def stacked_up(self):
    """All experts' B stacked: [e * r, f]."""
    return jnp.asarray(self.expert_b, self.dtype).reshape(-1, self.out_features)

  def mix_per_token(self, x, gates):
    """x: [b, t, d], gates: [b, t, e] -> [b, t, f]."""
    return mix_stacked(x, self.stacked_down(), self.stacked_up(), gates.astype(self.dtype))

  def per_slot(self, slot_inputs):
    """slot_inputs: [b, e, n, d] -> slot outputs [b, e, n, f]."""
    hidden = jnp.einsum("bend,edr->benr", slot_inputs, jnp.asarray(self.expert_a, self.dtype))
    return jnp.einsum("benr,erf->benf", hidden, jnp.asarray(self.expert_b, self.dtype))

  def __call__(self, x, gates):
    return self.mix_per_token(x, gates)
