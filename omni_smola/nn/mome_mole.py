"""MoME's mixture of language experts: bottleneck adapters, one chosen per example.

Not the repository's `mole` (`nn/mole.py`: top-k LoRA experts inside the adapted
projections, per token or per example); docs/DESIGN.md §3.7 sets the two side by side.
Here each of K experts is a bottleneck adapter parallel to an FFN,

    y_e(x) = s_e * up_e(ReLU(down_e(x)))        down_e: d -> r (64), up_e: r -> d,

and an `InstructionRouter` on the instruction embedding picks one per example:

    R(x) = g * y_e*(x),   e* = argmax_e G(I)_e,   g = 1 + G_e* - stop_gradient(G_e*)

`g` is exactly 1 in the forward pass (the paper's hard top-1 gate); its gradient is
that of `G_e*`, so the router learns as if the chosen expert were weighted by its
score (straight-through). Weighting by the score itself (as our MixLoRA does) would
scale the forward output by `G_e* < 1` and break the stage-2 start below.

The router reads `TokenContext.instance_features`, which the model fills with the
instruction embedding: never the layer's own tokens, so a causal decoder stays
causal. Only the chosen expert's weights are gathered per example (`[b, d, r]`),
so the FLOPs are one expert's. `up` starts at zero, so an untrained mixture adds
nothing. With `num_experts=1` (stage 1 trains a single adapter) there is no router;
`experts_from_single_adapter` copies that adapter into every expert for stage 2.

Letters: b batch, t token, e expert, d model width, r bottleneck width.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_smola.nn import initializers, routing_stats
from omni_smola.nn.instruction_router import InstructionRouter
from omni_smola.nn.stored_param import stored_param
from omni_smola.nn.token_context import TokenContext

# Each expert parameter's dimensions, the expert axis first: [e, d, r], [e, r], [e, r, d],
# [e, d], [e]. A scanned stack adds its layer axis in front.
EXPERT_PARAM_NDIM = {"down_kernel": 3, "down_bias": 2, "up_kernel": 3, "up_bias": 2,
                     "expert_scale": 1}
EXPERT_PARAMS = tuple(EXPERT_PARAM_NDIM)


def straight_through_top1(probabilities):
  """[b, e] -> (index [b], gate [b]): gate is 1 forward, d gate = d probabilities[index]."""
  index = jnp.argmax(probabilities, axis=-1)
  chosen = jnp.take_along_axis(probabilities, index[:, None], axis=-1)[:, 0]
  return index, 1.0 + chosen - jax.lax.stop_gradient(chosen)


class BottleneckMoLE(nn.Module):
  """[b, t, d] FFN input -> [b, t, d] residual added to the FFN's output.

  Attributes:
    num_experts: K (the paper's figure draws 4); 1: a single adapter, no router.
    bottleneck_dim: r (MoME: 64).
    router_hidden_dim: the router's W1 width; None: the instruction's width.
  """
  num_experts: int = 4
  bottleneck_dim: int = 64
  router_hidden_dim: Optional[int] = None
  axis: str = "embed"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context: TokenContext):
    batch, length, width = x.shape
    if self.num_experts < 1:
      raise ValueError(f"BottleneckMoLE.num_experts must be >= 1, got {self.num_experts}")
    experts, rank = self.num_experts, self.bottleneck_dim

    def param(name, init, shape, axes):
      return jnp.asarray(stored_param(self, name, nn.with_logical_partitioning(init, axes),
                                      shape, self.param_dtype), self.dtype)

    down = param("down_kernel", initializers.down_projection, (experts, width, rank),
                 ("expert", self.axis, None))
    down_bias = param("down_bias", nn.initializers.zeros, (experts, rank), ("expert", None))
    up = param("up_kernel", initializers.up_projection, (experts, rank, width),
               ("expert", None, self.axis))
    up_bias = param("up_bias", nn.initializers.zeros, (experts, width), ("expert", self.axis))
    scale = param("expert_scale", nn.initializers.ones, (experts,), ("expert",))

    if experts == 1:
      index, gate = jnp.zeros((batch,), jnp.int32), jnp.ones((batch,), jnp.float32)
    else:
      if context.instance_features is None:
        raise ValueError(
            "BottleneckMoLE routes on the instruction and got no "
            "TokenContext.instance_features: pass the instruction embedding "
            "(instruction_router.prompt_embedding); its own tokens would leak future "
            "positions in a causal decoder")
      context.check_shapes(batch, length, where="BottleneckMoLE")
      probabilities = InstructionRouter(experts, self.router_hidden_dim, name="router")(
          context.instance_features)
      index, gate = straight_through_top1(probabilities)
      if routing_stats.wants_stats(self):
        chosen = jax.nn.one_hot(index, experts)
        routing_stats.sow_expert_weights(
            self, jnp.broadcast_to(chosen[:, None, :], (batch, length, experts)),
            context.valid_mask(batch, length))

    hidden = jax.nn.relu(jnp.einsum("btd,bdr->btr", x.astype(self.dtype), down[index])
                         + down_bias[index][:, None, :])
    out = jnp.einsum("btr,brd->btd", hidden, up[index]) + up_bias[index][:, None, :]
    # The hard gate, the expert's scale and the padding mask are per example or token.
    weight = (gate * scale[index]).astype(self.dtype)[:, None, None]
    valid = context.valid_mask(batch, length).astype(self.dtype)[..., None]
    return out * weight * valid


def single_expert_broadcast(name: str, source, target_shape):
  """`source` (one expert: size 1 on the expert axis) copied to every expert of `target_shape`.

  `name` ends in one of `EXPERT_PARAMS`, whose dimensions place the expert axis; a scanned
  stack's leading layer axis is carried along. Anything else (K experts already, other
  widths) fails naming `name`.
  """
  source_shape, target_shape = tuple(source.shape), tuple(target_shape)
  expert_axis = len(target_shape) - EXPERT_PARAM_NDIM[name.rsplit("/", 1)[-1]]
  single = target_shape[:expert_axis] + (1,) + target_shape[expert_axis + 1:]
  if expert_axis < 0 or source_shape != single:
    raise ValueError(
        f"{name}: the single adapter has shape {source_shape}, the mixture's experts "
        f"{target_shape}: need one expert (size 1 on the expert axis) with the same other "
        "dimensions")
  return jnp.broadcast_to(source, target_shape)


def experts_from_single_adapter(mixture_params, single_params):
  """Stage 2's start: every expert of `mixture_params` becomes stage 1's adapter.

  Args:
    mixture_params: a `BottleneckMoLE(num_experts=K)`'s parameters (its router kept).
    single_params: a trained `BottleneckMoLE(num_experts=1)`'s parameters.
  Returns:
    `mixture_params` with each of `EXPERT_PARAMS` the single expert, K times. A run
    does this on its initial checkpoint with `train.mole_experts_from_single_adapter`
    (`checkpoints.mole_stage_two`).
  """
  copied = dict(mixture_params)
  for name in EXPERT_PARAMS:
    target = mixture_params[name]
    copied[name] = single_expert_broadcast(name, single_params[name], target.shape).astype(
        target.dtype)
  return copied
