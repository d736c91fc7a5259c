"""Closed-form parameter and FLOP counts of the adapters.

These formulas are the definition the tests hold the modules to and the
denominator of the benchmarks' efficiency: FLOPs are 2 per multiply-add of the
matmuls/einsums of the forward pass, counting only the tokens a group applies
to; softmaxes, norms and masks are not counted.
"""
from typing import Mapping, Optional

from omni_smola.nn.adapter_spec import AdapterSpec


def smola_params(num_experts, slots_per_expert, rank, d_in, d_out):
  # A, B; router slot parameters [d, e, p]; one router scale.
  return num_experts * rank * (d_in + d_out) + d_in * num_experts * slots_per_expert + 1


def adapter_param_count(spec: AdapterSpec, d_in: int, d_out: int,
                        groups: tuple = ("mm", "vis", "txt"),
                        d_context: Optional[int] = None) -> int:
  """Parameters one adapted projection adds.

  groups: the Omni-SMoLA groups present at this site (the decoder has no
    visual tokens, so no `vis` block). d_context: width of instance-routing
    features (default d_in).
  """
  d_context = d_in if d_context is None else d_context
  if spec.kind == "lora":
    return spec.rank * (d_in + d_out)
  if spec.kind == "task_lora":  # one LoRA per task of the bank
    return len(spec.tasks) * spec.rank * (d_in + d_out)
  if spec.kind == "smola":
    return smola_params(spec.num_experts, spec.slots_per_expert, spec.rank, d_in, d_out)
  if spec.kind == "omni_smola":
    return sum(smola_params(spec.experts_per_group[g], spec.slots_per_expert, spec.rank,
                            d_in, d_out)
               for g in groups if spec.experts_per_group[g])
  if spec.kind == "mixlora":
    k = spec.num_factors
    return k * (d_in + d_out) + 2 * d_context * k + k * k
  if spec.kind == "mole":
    router_in = d_in if spec.mole_level == "token" else d_context
    return spec.num_experts * spec.rank * (d_in + d_out) + router_in * spec.num_experts
  return 0


def smola_flops(num_experts, slots_per_expert, rank, d_in, d_out, tokens, routing):
  """One SMoLA block on `tokens` tokens of one example."""
  slots = num_experts * slots_per_expert
  router = 2 * tokens * d_in * slots
  if routing == "token":
    return router + 2 * tokens * num_experts * rank * (d_in + d_out)
  dispatch = 2 * tokens * slots * d_in
  experts = 2 * slots * rank * (d_in + d_out)
  combine = 2 * tokens * slots * d_out
  return router + dispatch + experts + combine


def adapter_forward_flops(spec: AdapterSpec, d_in: int, d_out: int,
                          tokens: Mapping[str, int], causal: bool = False,
                          d_context: Optional[int] = None) -> int:
  """Forward FLOPs of one adapted projection on ONE example.

  tokens: valid tokens per group, {'mm': all, 'vis': visual, 'txt': text}.
  """
  d_context = d_in if d_context is None else d_context
  total = tokens["mm"]
  routing = "token" if causal else spec.routing
  if spec.kind in ("lora", "task_lora"):  # a bank runs one specialist per example
    return 2 * total * spec.rank * (d_in + d_out)
  if spec.kind == "smola":
    return smola_flops(spec.num_experts, spec.slots_per_expert, spec.rank, d_in, d_out,
                       total, routing)
  if spec.kind == "omni_smola":
    return sum(smola_flops(spec.experts_per_group[g], spec.slots_per_expert, spec.rank,
                           d_in, d_out, tokens.get(g, 0), routing)
               for g in ("mm", "vis", "txt") if spec.experts_per_group[g])
  if spec.kind == "mixlora":
    k = spec.num_factors
    routing_flops = 2 * d_context * k * 2 + 2 * k * k
    return routing_flops + 2 * total * spec.rank * (d_in + d_out)
  if spec.kind == "mole":
    experts = 2 * total * spec.num_experts * spec.rank * (d_in + d_out)
    if spec.mole_level == "token":
      return experts + 2 * total * d_in * spec.num_experts
    return experts + 2 * d_context * spec.num_experts
  return 0


def dense_forward_flops(d_in: int, d_out: int, tokens: int) -> int:
  return 2 * tokens * d_in * d_out
