"""Model-level accounting: parameters, optimizer state and forward FLOPs, never allocated.

Parameters are counted exactly on `jax.eval_shape` of the model's initialisation, so a
PaLI-3-sized (or larger) config costs one trace and no memory. Each parameter is filed
by its path under a stack (vision, encoder, decoder, and the token `embedding` both text
stacks share) and a component: `backbone`, or the adapter group it belongs to (`mm`,
`vis`, `txt` for (Omni-)SMoLA, the adapter kind otherwise, `specialist` for a second
adapter).

FLOPs are analytic, 2 per multiply-add of the forward pass's matmuls (norms,
softmaxes, masks and gathers are free), for ONE teacher-forced example with every
position of `TASK_FEATURE_LENGTHS` filled (what the backbone computes whatever the
padding; the adapters' formulas count the same tokens):

* vision: `(image_size / patch_size)^2` patch tokens;
* encoder: those visual tokens followed by `inputs` prompt tokens (text-only
  models: the prompt alone);
* decoder: `targets` tokens; self-attention scores are the full square the
  masked implementation computes; the cross-attention keys/values run over the
  encoder's tokens (they are filed under the decoder, where their parameters are).

Which tokens a projection runs on, the widths its kernel contracts and produces, and
each attention's query and key counts are not read off names: the trace that counts
the parameters records them from the calls (`omni_smola.trace_records`), so a renamed
module cannot silently change a count. Backbone FLOPs come from the kernels themselves
(2 x tokens x kernel size) plus the attention scores; adapter FLOPs and a closed-form
check of every adapted site's parameter count come from `omni_smola.nn.accounting`.
"""
import contextlib
import copy
import dataclasses
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from flax import traverse_util

from omni_smola import mome_accounting, param_layout, trace_records
from omni_smola.nn import SLOT_NAMES, AdapterSpec
from omni_smola.nn import accounting as adapter_accounting
from omni_smola.training import optimizers, partitioned_step, program_cache
from omni_smola.training.train_state import split_params

STACKS = ("vision", "encoder", "decoder", "embedding")
DEFAULT_TASK_FEATURE_LENGTHS = {"inputs": 32, "targets": 32}
REFERENCE_OPTIMIZERS = ("adafactor", "adamw")

# The stack a parameter is filed under in reports, by its '/'-joined path; first match
# wins. Filing is a reporting choice, not a fact of the trace, and a path no rule
# matches is an error (never a silent misfiling); token counts come from the trace.
STACK_RULES = (
    (r"^img(/|_projection/)", "vision"),
    (r"^(vision_towers|move)/", "vision"),  # MoME's other towers and MoVE
    (r"(^|/)encoder/", "encoder"),
    (r"(^|/)decoder/", "decoder"),
    (r"(^|/)token_embedder/", "embedding"),
)


def _first_match(rules, name: str, default=None):
  return next((value for pattern, value in rules if re.search(pattern, name)), default)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """Tokens of one example per sequence: the FLOP counts' assumption."""
  visual: int
  inputs: int
  targets: int

  @classmethod
  def of(cls, model, task_feature_lengths: Mapping[str, int]) -> "TokenLayout":
    vision, move = model.config.vision, model.config.move
    visual = 0 if vision is None else (
        vision.num_patches if move is None else move.adt.num_queries)  # MoVE's L tokens
    return cls(visual=visual,
               inputs=int(task_feature_lengths["inputs"]),
               targets=int(task_feature_lengths["targets"]))

  def length(self, stack: str) -> int:
    """A stack's own sequence: the per-token denominator of its FLOPs."""
    return {"vision": self.visual, "encoder": self.visual + self.inputs,
            "decoder": self.targets}[stack]


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One parameter: where it is and what it is for."""
  path: str
  shape: Tuple[int, ...]
  dtype: Any
  stack: str
  component: str  # 'backbone' or an adapter group
  trainable: bool
  site: Optional[str] = None  # the adapted projection, for adapter parameters
  adapter_module: Optional[str] = None

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    return self.size * np.dtype(self.dtype).itemsize


def abstract_params(model, layout: TokenLayout
                    ) -> Tuple[Any, trace_records.TraceRecords]:
  """Boxed `ShapeDtypeStruct` parameters of `model` (one trace, nothing allocated).

  Returns them with what every projection and attention saw during that trace.
  """
  shapes = {"encoder_input_tokens": (1, max(layout.inputs, 1)),
            "decoder_input_tokens": (1, max(layout.targets, 1))}
  if model.config.vision is not None:
    size = model.config.vision.image_size
    shapes["image"] = (1, size, size, 3)
  # Every jnp op is a small jit of its own; tracing those nested jits dominates the
  # trace of a large unrolled model, and eval_shape gives the same shapes without them.
  # A scan must stay jitted: without jit it runs its body once per layer, eagerly
  # (pali3 scanned: 1.6 s jitted, 19.7 s with jit disabled).
  vision = model.config.vision
  scanned = model.config.text.scan_layers or (vision is not None and vision.scan_layers)
  no_jit = contextlib.nullcontext() if scanned else jax.disable_jit()
  with no_jit, program_cache.unshared(), trace_records.recording() as records:
    params = partitioned_step.abstract_variables(model, shapes)["params"]
  return params, records


def _adapter_spec(model, slot: str) -> Optional[AdapterSpec]:
  return getattr(model.adapters, slot)


def classify(model, params, trainable_mask) -> List[Leaf]:
  """Every parameter of the (unboxed, abstract) `params` as a `Leaf`, one per layer.

  Scanned stacks are counted layer by layer (`param_layout.per_layer`), so sites, widths
  and totals are the same whether the model scans its layers or not.
  """
  flat = traverse_util.flatten_dict(dict(params), keep_empty_nodes=False)
  flat_mask = traverse_util.flatten_dict(dict(trainable_mask), keep_empty_nodes=False)
  leaves = []
  for stacked_key, stacked_value in flat.items():
    for key, value in param_layout.per_layer(stacked_key, stacked_value):
      path = "/".join(key)
      stack = _first_match(STACK_RULES, path)
      if stack is None:
        raise ValueError(f"accounting: no stack for parameter {path!r}; extend STACK_RULES")
      position = param_layout.adapter_position(key, model.adapters)
      component, site, module = param_layout.BACKBONE, None, None
      if position is not None:
        component, site, module = position.component, position.site, position.slot
      leaves.append(Leaf(path, tuple(value.shape), value.dtype, stack, component,
                         bool(flat_mask[stacked_key]), site, module))
  return leaves


# ------------------------------------------------------------------------- FLOPs


def _projection(records: trace_records.TraceRecords, module: str, size: Optional[int] = None
                ) -> trace_records.ProjectionRecord:
  """The traced record of projection `module` (a per-layer name), checked on its kernel."""
  record = records.projection(module)
  if record is None:
    raise ValueError(f"accounting: {module!r} has a kernel but no traced projection; "
                     "record its module in omni_smola.trace_records")
  if size is not None and record.d_in * record.d_out != size:
    raise ValueError(f"accounting: {module} traced {record.d_in} -> {record.d_out}, but "
                     f"its kernel has {size} values")
  return record


def _attention_layers(records: trace_records.TraceRecords, leaves: Sequence[Leaf]
                      ) -> Dict[str, Tuple[str, trace_records.AttentionRecord]]:
  """Every attention per layer (a scanned one was traced once): path -> (stack, record)."""
  found = {}
  for leaf in leaves:
    keys = leaf.path.split("/")
    for end in range(1, len(keys)):
      path = "/".join(keys[:end])
      if path not in found:
        record = records.attention(path)
        if record is not None:
          found[path] = (leaf.stack, record)
  return found


def backbone_flops(model, leaves: Sequence[Leaf], records: trace_records.TraceRecords,
                   layout: TokenLayout) -> Dict[str, int]:
  """Forward FLOPs of the frozen network per stack: projections and attention scores."""
  flops = {stack: 0 for stack in STACKS}
  backbone = [leaf for leaf in leaves if leaf.component == "backbone"]
  for leaf in backbone:
    if leaf.path.endswith("/kernel"):
      record = _projection(records, leaf.path[:-len("/kernel")], leaf.size)
      flops[leaf.stack] += 2 * record.tokens * leaf.size
  for stack, attention in _attention_layers(records, backbone).values():
    # q.k scores and the weighted sum of values
    flops[stack] += 2 * 2 * attention.query_tokens * attention.key_tokens * attention.width
  text = model.config.text
  if text.logits_via_embedding:
    flops["decoder"] += 2 * layout.targets * text.emb_dim * text.vocab_size
  return flops


@dataclasses.dataclass
class AdaptedSite:
  """One adapted projection: its widths, tokens and what its adapter adds."""
  site: str
  module: str
  stack: str
  d_in: int
  d_out: int
  tokens: Mapping[str, int]  # per Omni-SMoLA group, as traced
  causal: bool
  d_context: int
  params: Dict[str, int]  # per group, counted on the tree
  flops: Dict[str, int] = dataclasses.field(default_factory=dict)
  closed_form_params: int = 0


def adapted_sites(model, leaves: Sequence[Leaf], records: trace_records.TraceRecords
                  ) -> List[AdaptedSite]:
  """Every adapted projection with its adapter's FLOPs and closed-form parameter count."""
  sites: Dict[Tuple[str, str], AdaptedSite] = {}
  for leaf in leaves:
    if leaf.site is None or leaf.adapter_module not in SLOT_NAMES:
      continue  # a backbone parameter, or a MoME module (`mome_parts`), not on a projection
    key = (leaf.site, leaf.adapter_module)
    if key not in sites:
      record = _projection(records, leaf.site)
      sites[key] = AdaptedSite(leaf.site, leaf.adapter_module, leaf.stack, record.d_in,
                               record.d_out, dict(record.group_tokens), record.causal,
                               record.d_context, params={})
    sites[key].params[leaf.component] = sites[key].params.get(leaf.component, 0) + leaf.size
  for site in sites.values():
    spec = _adapter_spec(model, site.module)
    if spec is None:
      continue
    groups = tuple(g for g in param_layout.GROUPS if g in site.params)
    site.closed_form_params = adapter_accounting.adapter_param_count(
        spec, site.d_in, site.d_out, groups=groups, d_context=site.d_context)
    site.flops = _site_flops(spec, site, groups, site.tokens, site.d_context)
  return list(sites.values())


def _site_flops(spec: AdapterSpec, site: AdaptedSite, groups, tokens, d_context):
  if spec.kind in ("smola", "omni_smola"):
    experts = ({"mm": spec.num_experts} if spec.kind == "smola"
               else dict(spec.experts_per_group))
    routing = "token" if site.causal else spec.routing
    return {g: adapter_accounting.smola_flops(experts[g], spec.slots_per_expert, spec.rank,
                                              site.d_in, site.d_out, tokens[g], routing)
            for g in groups}
  group = next(iter(site.params))
  return {group: adapter_accounting.adapter_forward_flops(
      spec, site.d_in, site.d_out, tokens, causal=site.causal, d_context=d_context)}


def _mome_part_pattern(part: str) -> str:
  """The paths of a `mome_accounting.mome_parts` part."""
  kind, _, name = part.partition("/")
  if kind == "tower":
    return r"^img/" if name == "img" else rf"^vision_towers/{re.escape(name)}/"
  if kind == "move":
    return rf"^move/{re.escape(name)}/"
  return r"/mome_mole/"


def _group_of(mome_part: str) -> str:
  """The component (`param_layout.ADDED_MODULES`) a MoME part's parameters are filed under."""
  return mome_part.split("/")[0]


def mome_flops(model, layout: TokenLayout) -> Dict[str, Dict[str, int]]:
  """{stack: {MoME part: forward FLOPs of one example}}, closed form (`mome_accounting`)."""
  return mome_accounting.mome_flops(
      model.config, {stack: layout.length(stack) for stack in ("encoder", "decoder")})


def mome_parts(model, leaves: Sequence[Leaf]) -> Dict[str, Dict[str, int]]:
  """MoME's towers, ADT modules, routers and MoLE: counted on the tree and in closed form."""
  return {part: {"parameters": _sum(l.size for l in leaves
                                    if re.search(_mome_part_pattern(part), l.path)),
                 "closed_form": closed_form}
          for part, closed_form in mome_accounting.mome_parts(model.config).items()}


# --------------------------------------------------------------------- optimizer


def optimizer_state_bytes(tx, trainable) -> Tuple[int, int]:
  """(bytes, values) of `tx.init(trainable)`, traced, not run."""
  state = jax.eval_shape(tx.init, trainable)
  leaves = [x for x in jax.tree_util.tree_leaves(state) if hasattr(x, "shape")]
  values = sum(int(np.prod(x.shape, dtype=np.int64)) for x in leaves)
  nbytes = sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
               for x in leaves)
  return nbytes, values


# ----------------------------------------------------------------------- account


def _sum(values) -> int:
  return int(sum(values))


def parameter_summary(leaves: Sequence[Leaf], groups: Sequence[str]) -> Dict[str, Any]:
  """Counts: totals, per adapter group, per stack, trainable vs frozen."""
  components = ["backbone", *groups]
  by_stack = {}
  for stack in STACKS:
    mine = [l for l in leaves if l.stack == stack]
    by_stack[stack] = {c: _sum(l.size for l in mine if l.component == c) for c in components}
    by_stack[stack]["total"] = _sum(l.size for l in mine)
    by_stack[stack]["trainable"] = _sum(l.size for l in mine if l.trainable)
  total = _sum(l.size for l in leaves)
  trainable = _sum(l.size for l in leaves if l.trainable)
  return {
      "total": total,
      "backbone": _sum(l.size for l in leaves if l.component == "backbone"),
      "adapters": _sum(l.size for l in leaves if l.component != "backbone"),
      "by_group": {g: _sum(l.size for l in leaves if l.component == g) for g in groups},
      "trainable": trainable,
      "frozen": total - trainable,
      "trainable_fraction": trainable / total if total else 0.0,
      "trainable_bytes": _sum(l.nbytes for l in leaves if l.trainable),
      "frozen_bytes": _sum(l.nbytes for l in leaves if not l.trainable),
      "by_stack": by_stack,
  }


def optimizer_summary(trainable, optimizer_name: Optional[str]) -> Dict[str, Any]:
  """State bytes of the run's optimizer and of the reference ones, on `trainable`."""
  names = ([optimizer_name] if optimizer_name else []) + [
      n for n in REFERENCE_OPTIMIZERS if n != optimizer_name]
  summary = {"name": optimizer_name, "state_bytes": {}, "state_values": {}}
  for name in names:
    tx = optimizers.create_optimizer(name=name, learning_rate=1.0).tx
    summary["state_bytes"][name], summary["state_values"][name] = optimizer_state_bytes(
        tx, trainable)
  return summary


def flop_summary(model, leaves: Sequence[Leaf], sites: Sequence[AdaptedSite],
                 records: trace_records.TraceRecords, layout: TokenLayout,
                 groups: Sequence[str], mome: Mapping[str, Mapping[str, int]]
                 ) -> Dict[str, Any]:
  """Forward FLOPs of one example per stack (and per token), backbone and adapters.

  `mome`: `mome_flops`, the MoME parts' FLOPs, filed under their groups' columns.
  """
  backbone = backbone_flops(model, leaves, records, layout)
  flops = {}
  for stack in STACKS:
    per_group = {g: _sum(s.flops.get(g, 0) for s in sites if s.stack == stack)
                 + _sum(f for part, f in mome.get(stack, {}).items() if _group_of(part) == g)
                 for g in groups}
    tokens = layout.length(stack) if stack != "embedding" else 0
    adapters = _sum(per_group.values())
    flops[stack] = {
        "tokens": tokens, "backbone": backbone[stack], "adapters": adapters,
        "adapters_by_group": per_group,
        "backbone_per_token": backbone[stack] / tokens if tokens else 0.0,
        "adapters_per_token": adapters / tokens if tokens else 0.0,
    }
  total_backbone = _sum(backbone.values())
  total_adapters = _sum(f["adapters"] for f in flops.values())
  flops["total"] = {
      "backbone": total_backbone, "adapters": total_adapters,
      "adapters_by_group": {g: _sum(flops[s]["adapters_by_group"][g] for s in STACKS)
                            for g in groups},
      "adapter_to_backbone": total_adapters / total_backbone if total_backbone else 0.0,
  }
  return flops


def account_model(model, task_feature_lengths: Optional[Mapping[str, int]] = None,
                  trainable_mode: str = "adapters",
                  trainable_overrides: Sequence[Tuple[str, bool]] = (),
                  optimizer_name: Optional[str] = None) -> Dict[str, Any]:
  """The whole account of `model` (a `PaliModel`) as a JSON-serialisable dict.

  Args:
    task_feature_lengths: {'inputs', 'targets'}; the token assumption of the FLOPs.
    trainable_mode, trainable_overrides: as the trainer's (what is trained).
    optimizer_name: the run's optimizer (`create_optimizer.name`); its state is
      counted exactly, and Adafactor's and AdamW's are given for comparison.

  Within `program_cache.shared_programs()` an equal model's account is computed once (a
  study accounts every arm, most of one model, before training and again on a rerun).
  """
  lengths = dict(task_feature_lengths or DEFAULT_TASK_FEATURE_LENGTHS)
  overrides = tuple(tuple(o) for o in trainable_overrides)
  key = ("account_model", model.fingerprint, tuple(sorted(lengths.items())), trainable_mode,
         overrides, optimizer_name)
  return copy.deepcopy(program_cache.get_or_build(key, lambda: _account(
      model, lengths, trainable_mode, overrides, optimizer_name)))


def _account(model, lengths, trainable_mode, trainable_overrides, optimizer_name):
  layout = TokenLayout.of(model, lengths)
  boxed, records = abstract_params(model, layout)
  mask = param_layout.unbox(model.trainable_mask(boxed, trainable_mode, tuple(trainable_overrides)))
  params = param_layout.unbox(boxed)
  leaves = classify(model, params, mask)
  groups = sorted({l.component for l in leaves} - {"backbone"}, key=_component_order)
  sites = adapted_sites(model, leaves, records)
  mismatches = [f"{s.site}/{s.module}: counted {sum(s.params.values())}, closed form "
                f"{s.closed_form_params}" for s in sites
                if _adapter_spec(model, s.module) is not None
                and sum(s.params.values()) != s.closed_form_params]
  mome = mome_parts(model, leaves)
  mome_flop_parts = mome_flops(model, layout)
  mismatches += [f"{part}: counted {p['parameters']}, closed form {p['closed_form']}"
                 for part, p in mome.items() if p["parameters"] != p["closed_form"]]
  vision, text = model.config.vision, model.config.text
  return {
      "model": {"config": model.config_name,
                "adapters": {slot: _spec_dict(spec) for slot, spec in model.adapters.items()},
                "vision": dataclasses.asdict(vision) if vision is not None else None,
                "text": dataclasses.asdict(text)},
      "trainable_mode": trainable_mode,
      "trainable_overrides": [list(o) for o in trainable_overrides],
      "assumptions": {
          "task_feature_lengths": lengths,
          "image_size": vision.image_size if vision is not None else None,
          "patch_size": vision.patch_size if vision is not None else None,
          "tokens": {"vision": layout.visual, "encoder_visual": layout.visual,
                     "encoder_text": layout.inputs, "encoder": layout.length("encoder"),
                     "decoder": layout.targets},
          "flops": "forward, one teacher-forced example, every position of "
                   "TASK_FEATURE_LENGTHS filled; 2 per multiply-add of matmuls only",
      },
      "parameters": parameter_summary(leaves, groups),
      "optimizer": optimizer_summary(split_params(params, mask)[0], optimizer_name),
      "flops": flop_summary(model, leaves, sites, records, layout, groups, mome_flop_parts),
      "adapted_sites": len(sites),
      "adapted_projections": {module: sorted(s.site for s in sites if s.module == module)
                              for module in sorted({s.module for s in sites})},
      "mome": mome,
      "mome_flops": mome_flop_parts,
      "closed_form_mismatches": mismatches,
  }


def trainable_parameter_count(model, trainable_mode: str = "adapters") -> int:
  """How many parameters of `model` a run in `trainable_mode` trains (nothing allocated)."""
  boxed, _ = abstract_params(model, TokenLayout.of(model, DEFAULT_TASK_FEATURE_LENGTHS))
  mask = param_layout.unbox(model.trainable_mask(boxed, trainable_mode))
  params = param_layout.unbox(boxed)
  return sum(int(np.prod(leaf.shape))
             for leaf, trains in zip(jax.tree_util.tree_leaves(params),
                                     jax.tree_util.tree_leaves(mask)) if trains)


def matching_lora_rank(lora_model, target_trainable: int) -> int:
  """The LoRA rank whose trainable parameters come closest to `target_trainable`.

  `lora_model` carries a LoRA `adapter` (any rank) on the sites to compare: a LoRA's
  parameters are linear in its rank, r * sum over sites of (d_in + d_out), so one count
  gives every rank's. This is how a comparison puts LoRA at the parameter count of
  another adapter (the paper's LoRA baseline is compared at a fixed rank instead).
  """
  spec = lora_model.adapters.adapter
  if spec is None or spec.kind != "lora":
    raise ValueError(f"matching_lora_rank needs a model whose `adapter` slot is a LoRA, "
                     f"got {spec!r}")
  per_rank = trainable_parameter_count(lora_model) / spec.rank
  return max(1, int(round(target_trainable / per_rank)))


def _component_order(name: str):
  order = {g: i for i, g in enumerate(param_layout.GROUPS)}
  return (order.get(name, len(order)), name)


def _spec_dict(spec: Optional[AdapterSpec]) -> Optional[Dict[str, Any]]:
  if spec is None:
    return None
  out = dataclasses.asdict(spec)
  out["experts_per_group"] = dict(spec.experts_per_group)
  out["sites"] = list(spec.sites)
  return out
