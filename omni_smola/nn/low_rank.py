"""What every adapter family shares: the projection it adapts and its low-rank factors.

Each family (LoRA, the `task_lora` bank, MixLoRA's factor pools, SMoLA's and MoLE's
experts, Omni-SMoLA's blocks) adds a residual to one projection `[.., d] -> [.., f]`,
built by `AdaptedDense` from the same keyword arguments (`build_adapter`), and most own
a down factor `A` and an up factor `B`. The factors' names, shapes, logical axes and
initialisers are read by checkpoints, the sharding rules, the merge and the accounting,
so they are declared in one place, `LowRankAdapter.factors`:

    A [*stacked, d, r]   axes (*stacked axes, in_axis, 'lora_rank')   fan-in over d
    B [*stacked, r, f]   axes (*stacked axes, 'lora_rank', out_axis)  zeros

`stacked` are leading axes (experts, specialists). An untrained adapter's residual is
exactly zero, since B starts at zero (`initializers`).
"""
import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from omni_smola.nn import initializers
from omni_smola.nn.stored_param import stored_param


class LowRankAdapter(nn.Module):
  """The fields of an adapter on one projection, `d = in_features` -> `f = out_features`.

  Keyword-only, so that a family's own fields (rank, experts, ...) come first when
  it is built positionally.
  """
  _: dataclasses.KW_ONLY
  in_features: int
  out_features: int
  in_axis: str = "embed"
  out_axis: str = "mlp"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def projection_fields(self) -> Dict[str, Any]:
    """These fields by name: a child adapter on the same projection takes them."""
    return {name: getattr(self, name) for name in PROJECTION_FIELDS}

  def factors(self, names: Tuple[str, str], rank: Optional[int],
              stacked: Sequence[Tuple[int, str]] = ()):
    """Declares and returns the parameters (A, B) named `names` (A first, then B).

    `stacked`: `(size, logical axis name)` of each leading axis. `rank` None: the
    factors have no rank axis, `A [*stacked, d]` and `B [*stacked, f]` (MixLoRA's
    pools of rank-1 factors); A's fan-in is still d, so every A starts at std
    1/sqrt(d), as LoRA's does.
    """
    sizes = tuple(size for size, _ in stacked)
    axes = tuple(axis for _, axis in stacked)
    rank_axis = ((rank,), ("lora_rank",)) if rank is not None else ((), ())
    down_init = initializers.down_projection if rank is not None else initializers.down_vectors
    down = stored_param(self, names[0], nn.with_logical_partitioning(
        down_init, axes + (self.in_axis,) + rank_axis[1]),
                        sizes + (self.in_features,) + rank_axis[0], self.param_dtype)
    up = stored_param(self, names[1], nn.with_logical_partitioning(
        initializers.up_projection, axes + rank_axis[1] + (self.out_axis,)),
                      sizes + rank_axis[0] + (self.out_features,), self.param_dtype)
    return down, up


# LowRankAdapter's own fields (flax adds `parent` and `name` to every module's).
PROJECTION_FIELDS = tuple(name for name in LowRankAdapter.__annotations__
                          if name not in ("_", "parent", "name"))
