"""Folding LoRA adapters into the frozen kernels they adapt: `W' = W + (alpha / r) A B`.

A LoRA slot's residual `(alpha / r) x A B` is linear in `x` with fixed weights, so
adding `(alpha / r) A B` to the kernel gives the same outputs with no adapter:
one matmul per projection again, and a model any HF loader can run.
`AdaptedDense` shows its adapters the kernel's input axes flattened (`d`) and its
output axes flattened (`f`), and the kernel keeps its input axes first, so the
`[d, f]` product reshapes onto the kernel (attention's query `[embed, heads, kv]`:
d = embed, f = heads * kv; its output `[heads, kv, embed]`: d = heads * kv) with
no transpose.

SMoLA, Omni-SMoLA, MixLoRA and MoLE weigh their experts by the input (routers,
factor selectors), so no fixed kernel equals them: their slots are kept, and the
merged plan still holds them.

Einsum letters: d = the adapter's input width, r = rank, f = its output width.
"""
import dataclasses
from typing import Dict, Mapping, Tuple

from absl import logging
import numpy as np

from omni_smola import param_layout
from omni_smola.checkpoints.tree import Flat
from omni_smola.nn.adapter_plan import AdapterPlan

MERGEABLE_KINDS = ("lora",)


class NothingToMergeError(ValueError):
  """A merge was asked of a model (or parameters) that hold no LoRA adapter."""


@dataclasses.dataclass(frozen=True)
class MergeResult:
  """The merged parameters and what happened to each adapter slot.

  Attributes:
    params: `{path: array}` without the merged slots' parameters; adapted kernels
      include their LoRA.
    plan: the model's plan with the merged slots emptied (what runs `params`).
    merged: `{slot: number of kernels}` of the slots folded in.
    kept: `{slot: kind}` of the slots that cannot be merged and stay.
  """
  params: Flat
  plan: AdapterPlan
  merged: Dict[str, int]
  kept: Dict[str, str]


def lora_delta(lora_a: np.ndarray, lora_b: np.ndarray, scale: float,
               kernel_shape: Tuple[int, ...]) -> np.ndarray:
  """`(alpha / r) A B` in the kernel's shape, in float32."""
  delta = np.einsum("dr,rf->df", np.asarray(lora_a, np.float32),
                    np.asarray(lora_b, np.float32)) * np.float32(scale)
  if delta.size != int(np.prod(kernel_shape)):
    raise ValueError(f"LoRA factors {lora_a.shape} x {lora_b.shape} do not fit a kernel of "
                     f"shape {tuple(kernel_shape)}")
  return delta.reshape(kernel_shape)


def _describe(plan: AdapterPlan) -> str:
  slots = [f"{slot}: {spec.kind}" for slot, spec in plan.items()]
  return ", ".join(slots) if slots else "no adapter at all"


def merge_lora(params: Mapping[str, np.ndarray], plan: AdapterPlan) -> MergeResult:
  """Every LoRA slot of `plan` folded into `params` (flat, our layout).

  Raises NothingToMergeError, naming the plan's slots, when `plan` has no LoRA
  slot, or when a LoRA slot has no parameters in `params` (a checkpoint without
  that adapter: merging it would silently export the bare backbone).
  """
  lora_slots = {slot: spec for slot, spec in plan.items() if spec.kind in MERGEABLE_KINDS}
  if not lora_slots:
    raise NothingToMergeError(f"nothing to merge: the model has no LoRA adapter "
                              f"({_describe(plan)})")
  out = {path: np.asarray(value) for path, value in params.items()}
  merged = {slot: 0 for slot in lora_slots}
  for path in sorted(params):
    position = param_layout.adapter_position(path, plan)
    if (position is None or position.slot not in lora_slots
        or not path.endswith(f"/{position.slot}/lora_a")):
      continue
    prefix = path[:-len("lora_a")]
    kernel_path = f"{position.site}/kernel"
    kernel = out[kernel_path]
    delta = lora_delta(params[path], params[prefix + "lora_b"],
                       lora_slots[position.slot].scale, kernel.shape)
    out[kernel_path] = (kernel.astype(np.float32) + delta).astype(kernel.dtype)
    merged[position.slot] += 1
  missing = [slot for slot, count in merged.items() if not count]
  if missing:
    raise NothingToMergeError(f"the parameters hold no LoRA of slot {missing[0]!r} "
                              f"(the model's plan: {_describe(plan)})")
  for path in list(out):
    position = param_layout.adapter_position(path, plan)
    if position is not None and position.slot in lora_slots:
      del out[path]
  kept = {slot: spec.kind for slot, spec in plan.items()
          if spec.adds_residual and slot not in lora_slots}
  for slot, count in merged.items():
    logging.info("Merged the LoRA of slot %s into %d kernels", slot, count)
  for slot, kind in kept.items():
    logging.info("Kept slot %s (%s): its weights depend on the input, so it cannot be "
                 "merged into the kernels", slot, kind)
  merged_plan = dataclasses.replace(plan, **{slot: None for slot in lora_slots})
  return MergeResult(out, merged_plan, merged, kept)
