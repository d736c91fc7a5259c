"""Omni-SMoLA: SMoLA blocks for all tokens (`mm`) and per modality (`vis`, `txt`).

    y = x W + SMoLA_mm(x) + m_vis * SMoLA_vis(x) + m_txt * SMoLA_txt(x)

Each modality block routes only among its own tokens (its dispatch softmax never
sees the other modality) and its output is zero elsewhere.

How it is evaluated. The sequence is cut into segments: contiguous token ranges
on which a fixed set of blocks acts. With the PaLI layout known statically
(`TokenContext.num_visual_tokens`) there are two, `[visual]` with {mm, vis} and
`[text]` with {mm, txt}, so no FLOP goes to a token a block does not apply to;
with only a modality mask there is one segment with every block, masked. Per
segment, all its blocks share one pass over the tokens for each step: one
router matmul against their concatenated slots, one dispatch, one combine (or,
for `token` routing, one matmul against their stacked A and one against their
stacked B). Routing with separate calls per block would read the activations
once per block and add the outputs afterwards; at these widths those passes
cost more than the adapter's FLOPs.

Input fusion. The frozen projection `x W`, the router logits `x Phi` and, routed
per token, every expert's `x A` all read the segment's tokens. Given the frozen
kernel (`AdaptedDense` hands it over where `fuses_input_projection` says so), a
segment runs ONE product against `[W | Phi | A_all]` (`products.joint_product`) and
returns `x W` plus the residual; the parameters stay where they are, joined only
for the product. `input_fusion` (gin, off by default) turns it on per routing.

Letters: b batch, t token, s slot (expert-major), d input width, f output width.
Slot arrays are batch-major (`[b, s, d]`), so dispatch and combine are plain
batched matmuls over the examples with no transposes of the activations.
"""
import dataclasses
from typing import Dict, List, Mapping, Optional, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from omni_smola.nn.adapter_spec import AdapterSpec
from omni_smola.nn.low_rank import LowRankAdapter
from omni_smola.nn.low_rank_experts import mix_down_projected
from omni_smola.nn.products import joint_product, product
from omni_smola.nn.smola import SMoLAGroup, masked_softmax_over_tokens
from omni_smola.nn.soft_router import inverse_token_norm
from omni_smola.nn.token_context import TokenContext

GROUPS = ("mm", "vis", "txt")
FUSING_KINDS = ("smola", "omni_smola")  # the AdapterSpec kinds this module implements


@gin.configurable(module="omni_smola.nn.omni_smola")
def input_fusion(sequence_routing: bool = False, token_routing: bool = False
                 ) -> Dict[str, bool]:
  """Whether (Omni-)SMoLA projections read their input once, per routing.

  `sequence_routing`: `[W | Phi]` (the encoder's router logits); `token_routing`
  (also every causal layer, the decoder): `[W | Phi | A_all]`. Off by default: the
  joint product rounds `x W` differently from the frozen matmul (1 ulp), so an
  untrained adapter would no longer leave the backbone's output bit-identical
  (tests/test_adapter_math.py pins that); docs/DESIGN.md, section 7, has the
  measurements. Read while tracing: gin, e.g.
  `omni_smola.nn.omni_smola.input_fusion.sequence_routing = True`.
  """
  return {"sequence": sequence_routing, "token": token_routing}


def fuses_input_projection(spec: AdapterSpec, context) -> bool:
  """Whether an `AdaptedDense` carrying `spec` lets the adapter compute `x W` too."""
  if spec.kind not in FUSING_KINDS:
    return False
  routing = "token" if context.causal or spec.routing == "token" else "sequence"
  return input_fusion()[routing]


@dataclasses.dataclass(frozen=True)
class Segment:
  start: int
  stop: int
  groups: Tuple[str, ...]


def plan_segments(context: TokenContext, length: int, enabled: Tuple[str, ...]):
  """The segments of a sequence and whether blocks must mask by modality."""
  split = context.num_visual_tokens
  if split is None and context.visual is None:
    split = 0  # No visual mask: every token is text.
  if split is None:
    return [Segment(0, length, enabled)], True
  segments = []
  for start, stop, modality in ((0, split, "vis"), (split, length, "txt")):
    groups = tuple(g for g in enabled if g in ("mm", modality))
    if stop > start and groups:
      segments.append(Segment(start, stop, groups))
  return segments, False


class OmniSMoLA(LowRankAdapter):
  experts_per_group: Mapping[str, int]
  slots_per_expert: int
  rank: int
  scale: float
  routing: str = "sequence"

  @nn.compact
  def __call__(self, x, context: TokenContext, kernel: Optional[jnp.ndarray] = None,
               precision=None):
    """The residual [b, t, f]; given the frozen `kernel: [d, f]`, `x W` plus it (fused)."""
    batch, length = x.shape[:2]
    enabled = tuple(g for g in GROUPS if self.experts_per_group.get(g, 0))
    segments, masked = plan_segments(context, length, enabled)
    used = tuple(g for g in enabled if any(g in s.groups for s in segments))
    blocks = {g: SMoLAGroup(self.experts_per_group[g], self.slots_per_expert, self.rank,
                            **self.projection_fields(), name=g) for g in used}
    if self.is_initializing():
      for block in blocks.values():
        block(x[:, :1])
    valid = context.valid_mask(batch, length)
    visual = context.visual_mask(batch, length)
    group_masks = {"mm": valid, "vis": valid & visual, "txt": valid & ~visual}
    if not masked:  # Segments already separate the modalities.
      group_masks = {g: valid for g in GROUPS}

    # Each segment's tokens are sliced once and shared by every step below.
    segment_tokens = [x[:, segment.start:segment.stop] for segment in segments]
    causal_or_token = context.causal or self.routing == "token"
    pieces, logits, projected, down_projected = [], [], [], []
    for segment, tokens in zip(segments, segment_tokens):
      slots = jnp.concatenate([blocks[g].router.scaled_unit_slots() for g in segment.groups], 1)
      if kernel is None:
        segment_logits = product("btd,ds->bts", tokens.astype(jnp.float32), slots)
      else:
        parts = (kernel, slots) + ((self._stacked_down(segment, blocks),)
                                   if causal_or_token else ())
        outputs = joint_product("btd,dk->btk", tokens, parts, precision)
        projected.append(outputs[0].astype(self.dtype))
        segment_logits = outputs[1]
        down_projected.append(outputs[2].astype(self.dtype) if causal_or_token else None)
      segment_logits *= inverse_token_norm(tokens)[..., None]
      logits.append(self._split_by_group(segment_logits, segment, blocks))
    combine = self._combine_weights(segments, logits, group_masks, blocks)
    if causal_or_token:
      for i, (segment, tokens) in enumerate(zip(segments, segment_tokens)):
        pieces.append(self._token_routed(tokens, segment, combine[i], blocks,
                                         down_projected[i] if projected else None))
    else:
      dispatch = self._dispatch_weights(segments, logits, group_masks)
      slot_outputs = self._slot_outputs(segment_tokens, segments, dispatch, blocks)
      for segment, segment_combine in zip(segments, combine):
        weights = jnp.concatenate([segment_combine[g] for g in segment.groups], -1)
        outputs = jnp.concatenate([slot_outputs[g] for g in segment.groups], 1)
        pieces.append(product("bts,bsf->btf", weights.astype(self.dtype), outputs))
    if kernel is None:
      return self._assemble(pieces, segments, length, lambda start, stop: jnp.zeros(
          (batch, stop - start, self.out_features), self.dtype))
    return self._assemble(
        [p + q for p, q in zip(projected, pieces)], segments, length,
        lambda start, stop: jnp.einsum("btd,df->btf", x[:, start:stop], kernel,
                                       precision=precision))

  def _split_by_group(self, segment_logits, segment, blocks) -> Dict[str, jnp.ndarray]:
    parts, offset = {}, 0
    for g in segment.groups:
      parts[g] = segment_logits[..., offset:offset + blocks[g].num_slots]
      offset += blocks[g].num_slots
    return parts

  def _combine_weights(self, segments, logits, group_masks, blocks):
    """Per segment and block: softmax over the block's slots, masked, times alpha/r."""
    combine = []
    per_group = {g: [] for g in blocks}
    for segment, segment_logits in zip(segments, logits):
      weights = {}
      for g in segment.groups:
        mask = group_masks[g][:, segment.start:segment.stop]
        weights[g] = jax.nn.softmax(segment_logits[g], axis=-1) * mask[..., None]
        per_group[g].append((weights[g], mask))
      combine.append({g: w * self.scale for g, w in weights.items()})
    for g, parts in per_group.items():
      blocks[g].record_stats(jnp.concatenate([w for w, _ in parts], 1),
                             jnp.concatenate([m for _, m in parts], 1))
    return combine

  def _dispatch_weights(self, segments, logits, group_masks):
    """Per segment and block: softmax over the block's tokens, across segments."""
    dispatch = [{} for _ in segments]
    for g in {g for s in segments for g in s.groups}:
      where = [i for i, s in enumerate(segments) if g in s.groups]
      joined = jnp.concatenate([logits[i][g] for i in where], axis=1)
      mask = jnp.concatenate(
          [group_masks[g][:, segments[i].start:segments[i].stop] for i in where], axis=1)
      weights = masked_softmax_over_tokens(joined, mask)
      offset = 0
      for i in where:
        size = segments[i].stop - segments[i].start
        dispatch[i][g] = weights[:, offset:offset + size]
        offset += size
    return dispatch

  def _slot_outputs(self, segment_tokens, segments, dispatch, blocks):
    """Slot inputs summed over the segments a block spans, then its experts."""
    slot_inputs: Dict[str, List[jnp.ndarray]] = {}
    for segment, tokens, segment_dispatch in zip(segments, segment_tokens, dispatch):
      weights = jnp.concatenate([segment_dispatch[g] for g in segment.groups], -1)
      inputs = product("bts,btd->bsd", weights.astype(self.dtype), tokens)
      offset = 0
      for g in segment.groups:
        size = blocks[g].num_slots
        slot_inputs.setdefault(g, []).append(inputs[:, offset:offset + size])
        offset += size
    return {g: blocks[g].slot_outputs(sum(parts)) for g, parts in slot_inputs.items()}

  def _stacked_down(self, segment, blocks):
    """The A of every expert of the segment's blocks side by side: [d, e_all * r]."""
    return jnp.concatenate([blocks[g].experts.stacked_down() for g in segment.groups], 1)

  def _token_routed(self, tokens, segment, segment_combine, blocks, down_projected=None):
    """y = sum over the segment's experts (all its blocks' stacked) of gate * x A B.

    `down_projected`: `x A_all` when the fused product already computed it."""
    gates = []
    for g in segment.groups:
      weights = segment_combine[g]
      gates.append(weights.reshape(weights.shape[:2] + (blocks[g].num_experts, -1)).sum(-1))
    gates = jnp.concatenate(gates, -1).astype(self.dtype)  # [b, t, e_all]
    if down_projected is None:
      down_projected = product("btd,dk->btk", tokens, self._stacked_down(segment, blocks))
    up = jnp.concatenate([blocks[g].experts.stacked_up() for g in segment.groups], 0)
    return mix_down_projected(down_projected, up, gates)

  def _assemble(self, pieces, segments, length, gap):
    """Joins the segments' outputs in token order, `gap(start, stop)` where no block
    acts (zeros for the residual alone, `x W` when fused).

    A concatenation, whose gradient is plain slices of the cotangent (writing
    the pieces into a zero buffer would also differentiate the buffer: two more
    passes over [b, t, f])."""
    parts, position = [], 0
    for piece, segment in zip(pieces, segments):
      if segment.start > position:
        parts.append(gap(position, segment.start))
      parts.append(piece)
      position = segment.stop
    if position < length:
      parts.append(gap(position, length))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
