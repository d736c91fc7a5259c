"""What a projection needs to know about the tokens it sees, besides their values.

Adapters route over "the group's valid tokens of one example", so every adapted
projection needs the padding mask, the modality of each token and whether the
layer is causal. The model builds one `TokenContext` per stack and passes it down
unchanged; the projections never look at token ids.
"""
from typing import Optional

import flax.struct
import jax.numpy as jnp


@flax.struct.dataclass
class TokenContext:
  """Per-token side information for adapters.

  Attributes:
    valid: [batch, length] bool, False on padding. None: every token is valid.
    visual: [batch, length] bool, True on visual tokens. None: all text.
    num_visual_tokens: static layout hint. When the sequence is known to be
      `[visual tokens; text tokens]` with this many visual tokens (the PaLI
      encoder), groups run on slices instead of masks, so no FLOP is spent on a
      token a group does not apply to. `visual` is then ignored.
    causal: the layer attends causally (the decoder), so routing must not mix
      information across positions: `token` routing is forced and instance
      routing must come from `instance_features`.
    instance_features: [batch, d_ctx] features that instance-level routers
      (`mixlora`, `mole` at instance level) route on. None: the mean of the
      layer's own valid input tokens, which is only allowed when not causal.
    task_ids: [batch] int32, each example's `task_id` (`data/task_ids.py`): the
      specialist a `task_lora` bank gathers for it. None: unknown, which such a
      bank refuses.
  """
  valid: Optional[jnp.ndarray] = None
  visual: Optional[jnp.ndarray] = None
  num_visual_tokens: Optional[int] = flax.struct.field(pytree_node=False, default=None)
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  instance_features: Optional[jnp.ndarray] = None
  task_ids: Optional[jnp.ndarray] = None

  def valid_mask(self, batch: int, length: int) -> jnp.ndarray:
    if self.valid is None:
      return jnp.ones((batch, length), dtype=bool)
    return self.valid.astype(bool)

  def visual_mask(self, batch: int, length: int) -> jnp.ndarray:
    if self.num_visual_tokens is not None:
      positions = jnp.arange(length)[None, :]
      return jnp.broadcast_to(positions < self.num_visual_tokens, (batch, length))
    if self.visual is None:
      return jnp.zeros((batch, length), dtype=bool)
    return self.visual.astype(bool)

  def check_shapes(self, batch: int, length: int, where: str) -> None:
    """Fails early, naming the field, when a mask does not match the tokens."""
    for name in ("valid", "visual"):
      mask = getattr(self, name)
      if mask is not None and tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"TokenContext.{name} has shape {tuple(mask.shape)} but {where} sees "
            f"tokens of shape [batch={batch}, length={length}]")
    if self.num_visual_tokens is not None and not 0 <= self.num_visual_tokens <= length:
      raise ValueError(
          f"TokenContext.num_visual_tokens={self.num_visual_tokens} is outside "
          f"[0, {length}] at {where}")
    if self.instance_features is not None and self.instance_features.shape[0] != batch:
      raise ValueError(
          f"TokenContext.instance_features has batch {self.instance_features.shape[0]}, "
          f"{where} has batch {batch}")
    if self.task_ids is not None and tuple(self.task_ids.shape) != (batch,):
      raise ValueError(
          f"TokenContext.task_ids has shape {tuple(self.task_ids.shape)}, {where} has "
          f"batch {batch} (one task id per example)")
