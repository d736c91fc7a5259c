"""A stack of identical layers, unrolled or as one `nn.scan`, with optional rematerialisation.

Unrolled, layer i is a module `{name}_{i}` (T5X's and HF's per-layer layout). Scanned, the
stack is one module `{name}` whose parameters carry a leading axis of length `num_layers`
(logical name `layers`, unsharded by the rule table), as big_vision's scanned ViTs store them.
The scan traces and compiles one layer instead of `num_layers`: for PaLI-3's 96 layers that
is most of a train step's compile time (`benchmarks/compile_time.py`).

Everything a layer sows or caches is stacked the same way (`intermediates`, the decoding
`cache`); `param_layout.unstack_layers` turns a stacked tree back into per-layer names, so
routing statistics still come out per layer and either layout loads into the other.
"""
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax

from omni_smola.models.attention import CROSS_ATTENTION_KV
from omni_smola.nn import AdapterPlan
from omni_smola.nn.adapted_dense import plan_of

LAYERS_AXIS = "layers"
# `jax.checkpoint_policies` by name: what the backward pass may keep instead of recomputing.
REMAT_POLICIES: Dict[str, Optional[Callable]] = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # recompute everything
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def check_remat_policy(owner: str, policy: str) -> None:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"{owner}.remat_policy={policy!r} is not one of {sorted(REMAT_POLICIES)}")


def _holding_plan(layer_cls):
  """`layer_cls` with an `adapters` field: a lifted module cannot read its parents' plan."""

  class Layer(layer_cls):
    adapters: Optional[AdapterPlan] = None

  Layer.__name__ = layer_cls.__name__
  return Layer


def _scan_body(layer_cls):
  """`layer_cls` with scan's signature: (carry, *broadcast) -> (carry, None)."""

  class ScanBody(layer_cls):

    def __call__(self, carry, *args):
      return super().__call__(carry, *args), None

  ScanBody.__name__ = layer_cls.__name__
  return ScanBody


def apply_layers(owner: nn.Module, layer_cls, x, *args, num_layers: int, name: str,
                 scan: bool, remat: bool, remat_policy: str = "nothing_saveable",
                 **layer_fields: Any):
  """x after `num_layers` layers `layer_cls(**layer_fields)(x, *args)`.

  Call it from `owner`'s compact method. `args` are the same for every layer (masks,
  position biases, token contexts, the encoder output); only `x` flows from one layer to
  the next. Each layer gets `owner`'s adapter plan (`adapted_dense.plan_of`).
  """
  layer_fields = dict(layer_fields, adapters=plan_of(owner))
  layer_cls = _holding_plan(layer_cls)
  if scan:
    body = _scan_body(layer_cls)
    if remat:
      # Inside a scan, CSE cannot merge recomputation across iterations: no need to prevent it.
      body = nn.remat(body, prevent_cse=False, policy=REMAT_POLICIES[remat_policy])
    stack = nn.scan(body, variable_axes={"params": 0, "intermediates": 0, "cache": 0,
                                         CROSS_ATTENTION_KV: 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * len(args), length=num_layers,
                    metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
    x, _ = stack(**layer_fields, name=name)(x, *args)
    return x
  cls = nn.remat(layer_cls, policy=REMAT_POLICIES[remat_policy]) if remat else layer_cls
  for i in range(num_layers):
    x = cls(**layer_fields, name=f"{name}_{i}")(x, *args)
  return x
