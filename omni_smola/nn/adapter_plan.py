"""The model's one adapter setting: which spec each adapter slot of a projection holds.

A *slot* is a child module that every adapted projection may carry, named as the
field below, so its parameters live at `<projection path>/<slot>/...`:

* `adapter`: the generalist's adapter (LoRA, SMoLA, Omni-SMoLA, MixLoRA, MoLE);
* `specialist_adapter`: a second adapter on top, for the paper's generalist ->
  specialist recipe (the generalist's `adapter` is restored and frozen).

gin builds the plan once (`PaliModel.adapters = @AdapterPlan()`, then
`AdapterPlan.adapter = @AdapterSpec()`); the model's root module holds it and each
projection reads it from there (`AdaptedDense.plan`), so no module in between passes
adapter settings along. Adding a slot is adding a field here: the model, freezing,
accounting, checkpoint export and analysis all iterate `SLOT_NAMES`. A gin binding of
a slot that does not exist is gin's error naming `AdapterPlan` and the parameter.
"""
import dataclasses
from typing import Optional, Tuple

import gin

from omni_smola.nn.adapter_spec import AdapterConfigError, AdapterSpec


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AdapterPlan:
  """Slot name -> the spec of the adapter every matching projection carries in it.

  A slot left None (or holding a spec of kind 'none' / 'full') adds nothing.
  """
  adapter: Optional[AdapterSpec] = None
  specialist_adapter: Optional[AdapterSpec] = None

  def __post_init__(self):
    for slot, spec in self.items():
      if not isinstance(spec, AdapterSpec):
        raise AdapterConfigError(
            f"AdapterPlan.{slot} must be an AdapterSpec (gin: @AdapterSpec()), got {spec!r}")

  def items(self) -> Tuple[Tuple[str, AdapterSpec], ...]:
    """(slot, spec) for every slot that holds a spec, in `SLOT_NAMES` order."""
    return tuple((name, getattr(self, name)) for name in SLOT_NAMES
                 if getattr(self, name) is not None)

  def residual_slots(self, path: str) -> Tuple[Tuple[str, AdapterSpec], ...]:
    """The slots whose spec adds a residual to the projection at parameter `path`."""
    return tuple((slot, spec) for slot, spec in self.items() if spec.applies_to(path))


SLOT_NAMES: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AdapterPlan))
NO_ADAPTERS = AdapterPlan()
