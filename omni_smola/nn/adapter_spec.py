"""What adapter a dense layer carries, and where: one frozen, validated spec.

The spec is plain data so gin can build it (`AdapterSpec.kind = 'omni_smola'`) and
the model can hand one object to every projection it owns. Validation happens
here, once, so that a typo fails at start-up with the field's name rather than as a
shape error deep inside a jitted step.
"""
import dataclasses
import re
from typing import Mapping, Optional, Sequence, Tuple

import gin

ADAPTER_KINDS = ("none", "full", "lora", "smola", "omni_smola", "mixlora", "mole",
                 "task_lora")
ROUTINGS = ("sequence", "token")
MODALITY_GROUPS = ("mm", "vis", "txt")
MOLE_LEVELS = ("token", "instance")


class AdapterConfigError(ValueError):
  """A bad adapter setting; the message names the field."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Hyper-parameters of the residual adapter added to frozen projections.

  Attributes:
    kind: one of ADAPTER_KINDS. `none` and `full` add nothing (for `full` the
      trainer unfreezes the backbone instead).
    rank: r, the rank of every low-rank expert (for `mixlora`: factors selected).
    alpha: the LoRA scale numerator; the residual is multiplied by alpha / rank.
      None means alpha = rank (a scale of one).
    num_experts: experts of a `smola` or `mole` block.
    slots_per_expert: p, Soft MoE slots per expert (`sequence` routing).
    routing: `sequence` (Soft MoE over one example's tokens) or `token`. Causal
      layers always use `token`, whatever this says.
    experts_per_group: `omni_smola` experts per modality group (mm, vis, txt);
      0 disables a group.
    num_factors: `mixlora` pool size, for A and for B alike.
    top_k: `mole` experts chosen per token (or per example).
    mole_level: `mole` routing granularity, `token` or `instance`.
    tasks: `task_lora` only: the task names of its bank, one LoRA specialist per
      task, row i for `tasks[i]`; each example uses the row of its `task_id`
      (`nn/task_lora.py`). Serving binds it from the SPECIALISTS table
      (`checkpoints.specialist_bank.specialist_tasks`).
    sites: regular expressions searched in each projection's parameter path, such
      as `text/encoder/layers_0/mlp/wi_0` (PaLI: `img/...` for the ViT, `text/...`
      for the encoder-decoder); the adapter is attached where one is found (`mlp/`
      adapts every MLP projection, `^text/decoder/` only the decoder's). A regex that
      matches no projection stops the model's build (`check_sites_match`).
  """
  kind: str = "none"
  rank: int = 4
  alpha: Optional[float] = None
  num_experts: int = 4
  slots_per_expert: int = 1
  routing: str = "sequence"
  experts_per_group: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {"mm": 4, "vis": 4, "txt": 4})
  num_factors: int = 16
  top_k: int = 2
  mole_level: str = "token"
  tasks: Tuple[str, ...] = ()
  sites: Tuple[str, ...] = (".*",)

  def __post_init__(self):
    _check_choice("kind", self.kind, ADAPTER_KINDS)
    _check_choice("routing", self.routing, ROUTINGS)
    _check_choice("mole_level", self.mole_level, MOLE_LEVELS)
    _check_positive("rank", self.rank)
    _check_positive("num_experts", self.num_experts)
    _check_positive("slots_per_expert", self.slots_per_expert)
    _check_positive("num_factors", self.num_factors)
    _check_positive("top_k", self.top_k)
    if self.alpha is not None and not self.alpha > 0:
      raise AdapterConfigError(f"AdapterSpec.alpha must be > 0, got {self.alpha!r}")
    unknown = set(self.experts_per_group) - set(MODALITY_GROUPS)
    if unknown:
      raise AdapterConfigError(
          f"AdapterSpec.experts_per_group has unknown groups {sorted(unknown)}; "
          f"known groups are {MODALITY_GROUPS}")
    for group, count in self.experts_per_group.items():
      if not isinstance(count, int) or count < 0:
        raise AdapterConfigError(
            f"AdapterSpec.experts_per_group[{group!r}] must be an integer >= 0, "
            f"got {count!r}")
    if self.kind == "omni_smola" and not any(self.experts_per_group.values()):
      raise AdapterConfigError(
          "AdapterSpec.experts_per_group disables every group (mm, vis, txt); "
          "enable at least one or use kind='none'")
    if self.kind == "mole" and self.top_k > self.num_experts:
      raise AdapterConfigError(
          f"AdapterSpec.top_k={self.top_k} exceeds num_experts={self.num_experts}")
    if self.kind == "mixlora" and self.rank > self.num_factors:
      raise AdapterConfigError(
          f"AdapterSpec.rank={self.rank} exceeds num_factors={self.num_factors} "
          "(mixlora selects rank factors from the pool)")
    _check_tasks(self.kind, self.tasks)
    # gin hands lists; a tuple keeps the spec hashable (a static jit arg).
    object.__setattr__(self, "tasks", tuple(self.tasks))
    if isinstance(self.sites, str):
      object.__setattr__(self, "sites", (self.sites,))
    for pattern in self.sites:
      try:
        re.compile(pattern)
      except re.error as e:
        raise AdapterConfigError(f"AdapterSpec.sites has a bad regex {pattern!r}: {e}")
    # gin hands dicts; freeze them so the spec stays hashable (a static jit arg).
    object.__setattr__(self, "experts_per_group",
                       _FrozenDict({g: self.experts_per_group.get(g, 0)
                                    for g in MODALITY_GROUPS}))

  @property
  def scale(self) -> float:
    """alpha / r, the LoRA output multiplier."""
    return (self.alpha if self.alpha is not None else self.rank) / self.rank

  @property
  def adds_residual(self) -> bool:
    return self.kind not in ("none", "full")

  def applies_to(self, site: str) -> bool:
    """Whether the projection at `site` (e.g. `decoder/layers_3/mlp/wo`) is adapted."""
    return self.adds_residual and any(re.search(p, site) for p in self.sites)


def check_sites_match(slot: str, spec: Optional[AdapterSpec],
                      projection_paths: Sequence[str]) -> None:
  """Raises unless every regex of `spec.sites` matches one of the model's projections.

  `projection_paths` are the parameter paths of the projections that can carry the
  adapter of `slot` ('adapter', 'specialist_adapter'). A regex matching none of them
  would leave the model silently without that adapter where the user asked for one.
  """
  if spec is None or not spec.adds_residual:
    return
  for pattern in spec.sites:
    if not any(re.search(pattern, path) for path in projection_paths):
      # One line per kind of projection: layer numbers shown as {i}.
      kinds = sorted({re.sub(r"_\d+/", "_{i}/", path) for path in projection_paths})
      listing = ", ".join(kinds)
      raise AdapterConfigError(
          f"{slot}: AdapterSpec(kind={spec.kind!r}).sites regex {pattern!r} matches none "
          f"of the model's {len(projection_paths)} adaptable projections, whose parameter "
          f"paths are {listing or '(none: no projection takes this adapter)'}")


class _FrozenDict(dict):
  """A dict that hashes, so a spec holding one can be a static argument."""

  def __hash__(self):
    return hash(tuple(sorted(self.items())))

  def __setitem__(self, key, value):
    raise TypeError("AdapterSpec.experts_per_group is read-only")


def _check_tasks(kind, tasks):
  """A bank needs distinct task names; names on another kind would be silently unused."""
  if isinstance(tasks, str):
    raise AdapterConfigError(f"AdapterSpec.tasks must be a list of task names, got the "
                             f"string {tasks!r}")
  if kind != "task_lora":
    if tasks:
      raise AdapterConfigError(
          f"AdapterSpec.tasks={tuple(tasks)!r} is only read by kind='task_lora', not "
          f"kind={kind!r}")
    return
  if not tasks:
    raise AdapterConfigError("AdapterSpec(kind='task_lora') needs tasks: the task names of "
                             "its specialists (serving binds them from SPECIALISTS)")
  repeated = sorted({t for t in tasks if list(tasks).count(t) > 1})
  if repeated:
    raise AdapterConfigError(f"AdapterSpec.tasks names {repeated} more than once")
  for name in tasks:
    if not isinstance(name, str) or not name:
      raise AdapterConfigError(f"AdapterSpec.tasks holds {name!r}, not a task name")


def _check_choice(field, value, choices):
  if value not in choices:
    raise AdapterConfigError(
        f"AdapterSpec.{field}={value!r} is not one of {choices}")


def _check_positive(field, value):
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise AdapterConfigError(f"AdapterSpec.{field} must be an integer >= 1, got {value!r}")
