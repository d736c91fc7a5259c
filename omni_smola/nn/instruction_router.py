"""MoME's instruction router: per example, weights over choices from the instruction alone.

    G(I) = softmax(W2 GELU(W1 I + b1) + b2)          I: [b, d_I] -> G: [b, choices]

MoVE weighs its vision towers with it; MoME's MoLE picks its expert with one.
`I` is an embedding of the instruction (the prompt): the paper uses Sentence-BERT;
ours (`prompt_embedding`) is the masked mean of the frozen text embedder's
prompt-token embeddings, so routing needs no second language model and depends on
the prompt only (docs/DESIGN.md §3.7). Because `I` never sees the image or the
target tokens, the router is causal-safe in the decoder.

`EqualWeights` is the paper's "Addition" ablation: every choice weighs 1.
Letters: b batch, t prompt token, d widths, c choices.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def prompt_embedding(token_embeddings, prompt_mask):
  """[b, t, d] embeddings and [b, t] bool mask -> [b, d] float32 mean over the prompt.

  Works on any per-token prompt representation: the frozen embedder's output (the
  default) or the text encoder's output on the prompt alone (the alternative).
  """
  mask = prompt_mask.astype(jnp.float32)
  total = jnp.einsum("btd,bt->bd", token_embeddings.astype(jnp.float32), mask)
  return total / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)


def _check_choices(where: str, num_choices: int):
  if num_choices < 1:
    raise ValueError(f"{where}.num_choices must be >= 1 (one per tower or expert), "
                     f"got {num_choices}")


class InstructionRouter(nn.Module):
  """[b, d_I] instruction embedding -> [b, num_choices] float32 weights summing to one.

  Attributes:
    num_choices: towers (MoVE) or experts (MoME's MoLE).
    hidden_dim: the width of W1; None: the instruction's width.
  """
  num_choices: int
  hidden_dim: Optional[int] = None

  @nn.compact
  def __call__(self, instruction):
    _check_choices("InstructionRouter", self.num_choices)
    hidden_dim = self.hidden_dim or instruction.shape[-1]
    dense = lambda name, features, axes: nn.Dense(  # noqa: E731
        features, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))
    hidden = jax.nn.gelu(dense("hidden", hidden_dim, ("embed", "mlp"))(
        instruction.astype(jnp.float32)))
    logits = dense("logits", self.num_choices, ("mlp", None))(hidden)
    return jax.nn.softmax(logits, axis=-1)


class EqualWeights(nn.Module):
  """The ablation without a router: weight 1 on every choice (plain addition)."""
  num_choices: int

  @nn.compact
  def __call__(self, instruction):
    _check_choices("EqualWeights", self.num_choices)
    return jnp.ones((instruction.shape[0], self.num_choices), jnp.float32)
