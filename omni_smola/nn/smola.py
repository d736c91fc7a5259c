"""SMoLA: a soft mixture of low-rank experts (Omni-SMoLA, Wu et al., CVPR 2024).

A SMoLA block owns a router (`SoftRouter`, slots `phi: [d, e, p]`) and a stack
of low-rank experts (`LowRankExperts`). It acts on one token group:

* `sequence` routing is Soft MoE over the group's valid tokens of one example:
  `dispatch = softmax_t(logits)` (tokens outside the group or padded get exactly
  zero weight), `slots = dispatch^T x`, each slot goes through its expert, and
  `combine = softmax_(e,p)(logits)` mixes the slot outputs back per token. The
  expert FLOPs are per slot, not per token. Bidirectional only: a slot sees
  every token of the example.
* `token` routing treats each token as its own group. The dispatch over a group
  of one token is 1, so every slot of expert e sees the token itself and the
  combine weights of e's slots add up: `y = sum_e (sum_p combine[t,e,p]) f_e(x_t)`.
  With one slot per expert this is `softmax(x Phi)_e`. Causal by construction.

The arithmetic lives in `omni_smola.py`, which evaluates all blocks that act on
the same tokens together (one router matmul, one dispatch, one combine).
"""
import jax
import jax.numpy as jnp

from omni_smola.nn import routing_stats
from omni_smola.nn.low_rank import LowRankAdapter
from omni_smola.nn.low_rank_experts import LowRankExperts
from omni_smola.nn.soft_router import SoftRouter


def masked_softmax_over_tokens(logits, token_mask):
  """Softmax over axis 1 (tokens) that gives masked tokens exactly zero weight.

  logits: [b, t, ...] float32, token_mask: [b, t]. An example with no token in
  the group gets all-zero weights instead of NaN.
  """
  mask = token_mask.reshape(token_mask.shape + (1,) * (logits.ndim - 2))
  logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  return jax.nn.softmax(logits, axis=1) * mask


class SMoLAGroup(LowRankAdapter):
  """The parameters of one SMoLA block, and its routing statistics."""
  num_experts: int
  slots_per_expert: int
  rank: int

  def setup(self):
    self.router = SoftRouter(self.num_experts, self.slots_per_expert, self.in_features,
                             in_axis=self.in_axis)
    self.experts = LowRankExperts(self.num_experts, self.rank, **self.projection_fields())

  @property
  def num_slots(self):
    return self.num_experts * self.slots_per_expert

  def slot_outputs(self, slot_inputs):
    """[b, s, d] slots (expert-major within an example) -> [b, s, f]."""
    batch = slot_inputs.shape[0]
    per_expert = slot_inputs.reshape(batch, self.num_experts, self.slots_per_expert, -1)
    return self.experts.per_slot(per_expert).reshape(batch, self.num_slots, -1)

  def record_stats(self, combine, token_mask):
    """combine: [b, t, s] softmax over this block's slots; token_mask: [b, t]."""
    if routing_stats.wants_stats(self):
      per_expert = combine.reshape(combine.shape[:2] + (self.num_experts, -1)).sum(-1)
      routing_stats.sow_expert_weights(self, per_expert, token_mask)

  def __call__(self, x):
    """Initialises every parameter (used by `init`); returns the router logits."""
    return self.router(x), self.experts.stacked_down()
