"""Autoregressive decoding: greedy, temperature / top-k sampling and beam search.

The algorithms know nothing about the network. Each step calls

    tokens_to_logits(state: DecodingState) -> (logits [rows, vocab], new_cache)

where `state.token` [rows, 1] is the decoder input at position `state.index`
(the previous output; 0, the BOS id, at position 0), `state.sequences` [rows, L]
holds the outputs so far (for a model that recomputes instead of caching) and
`state.cache` is whatever the model carries between steps (flax `cache`
collection). Loops are `jax.lax.while_loop`s that stop as soon as every row has
emitted EOS (or, in beam search, no live beam can still win).

Conventions (t5x's):
* `prompt` [rows, L]: output position i is forced to `prompt[:, i]` where it is
  non-zero; its length is the number of positions decoded. Forced tokens do not
  count in the scores.
* After EOS a row emits 0 (padding) and its score stops changing.
* Scores are log-likelihoods under the model (untempered, unfiltered), summed over
  the decoded tokens up to and including EOS; beam search divides by t5x's
  length penalty `((5 + length) / 6) ** alpha`.
* Beam search returns beams sorted by score in increasing order: the best is last.
"""
from typing import Any, Callable, Tuple

import flax.struct
import jax
import jax.numpy as jnp

# A log-probability no real hypothesis reaches; sums of a few stay finite (no NaN).
NEG = -1.0e9


@flax.struct.dataclass
class DecodingState:
  index: jnp.ndarray  # int32 scalar: the output position being predicted
  token: jnp.ndarray  # [rows, 1] decoder input at `index`
  sequences: jnp.ndarray  # [rows, L] outputs so far, 0 from `index` on
  cache: Any


TokensToLogits = Callable[[DecodingState], Tuple[jnp.ndarray, Any]]


def length_penalty(alpha: float, length) -> jnp.ndarray:
  """t5x / GNMT: `((5 + length) / 6) ** alpha`; alpha = 0 turns it off."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def top_k_filter(logits, k: int):
  """Logits outside each row's k largest set to NEG (k <= 0: unchanged)."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth_largest = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth_largest, NEG, logits)


def _column(x, index):
  return jax.lax.dynamic_index_in_dim(x, index, axis=x.ndim - 1, keepdims=False)


def temperature_sample(tokens_to_logits: TokensToLogits, cache, prompt, *, rng=None,
                       temperature: float = 0.0, top_k: int = 0, eos_id: int = 1
                       ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Greedy (`temperature=0`) or sampled decoding of every row of `prompt`.

  Returns (sequences [rows, L] int32, scores [rows] float32).
  """
  rows, length = prompt.shape
  if temperature > 0 and rng is None:
    raise ValueError("sampling with temperature > 0 needs an rng")

  def cond(carry):
    index, _, _, _, ended, _ = carry
    return (index < length) & ~jnp.all(ended)

  def body(carry):
    index, token, sequences, scores, ended, cache = carry
    logits, cache = tokens_to_logits(DecodingState(index, token, sequences, cache))
    logits = logits.astype(jnp.float32)
    if temperature > 0:
      choice = jax.random.categorical(jax.random.fold_in(rng, index),
                                      top_k_filter(logits / temperature, top_k))
    else:
      choice = jnp.argmax(logits, axis=-1)
    forced_token = _column(prompt, index)
    forced = forced_token != 0
    choice = jnp.where(forced, forced_token, choice.astype(jnp.int32))
    choice = jnp.where(ended, 0, choice)
    log_probs = jax.nn.log_softmax(logits)
    chosen = jnp.take_along_axis(log_probs, choice[:, None], axis=-1)[:, 0]
    scores = scores + jnp.where(ended | forced, 0.0, chosen)
    sequences = jax.lax.dynamic_update_slice(sequences, choice[:, None], (0, index))
    ended = ended | (choice == eos_id)
    return index + 1, choice[:, None], sequences, scores, ended, cache

  carry = (jnp.array(0, jnp.int32), jnp.zeros((rows, 1), jnp.int32),
           jnp.zeros((rows, length), jnp.int32), jnp.zeros((rows,), jnp.float32),
           jnp.zeros((rows,), bool), cache)
  _, _, sequences, scores, _, _ = jax.lax.while_loop(cond, body, carry)
  return sequences, scores


def _gather_beams(x, index):
  """x [batch, beams, ...], index [batch, n] -> [batch, n, ...]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def reorder_rows(cache, rows):
  """Every cache leaf with its rows (leading axis) taken in the order `rows`."""
  return jax.tree_util.tree_map(lambda x: x[rows] if x.ndim else x, cache)


def beam_search(tokens_to_logits: TokensToLogits, cache, prompt, *, beam_size: int,
                alpha: float = 0.6, eos_id: int = 1,
                reorder_cache: Callable[[Any, jnp.ndarray], Any] = reorder_rows,
                ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Beam search over `prompt`'s rows (examples).

  `cache` has `batch * beam_size` rows, each example's beams consecutive (the
  model expands its encoder output per beam before initialising it);
  `reorder_cache(cache, rows)` follows the surviving beams (default: rows are
  every leaf's leading axis, leaves without one, cache indices, are shared; a
  model whose cache stacks layers first passes its own).

  Returns (sequences [batch, beam_size, L], scores [batch, beam_size]), sorted by
  length-penalised score, best last.
  """
  batch, length = prompt.shape
  beams = beam_size

  def cond(carry):
    index, _, live_logp, _, finished_scores, _ = carry
    # A live beam can at best keep its log-prob and reach the longest length.
    best_live = live_logp[:, 0] / length_penalty(alpha, length)
    worst_finished = finished_scores[:, -1]
    done = (worst_finished > NEG / 2) & (worst_finished >= best_live)
    return (index < length) & ~jnp.all(done)

  def body(carry):
    index, live_seqs, live_logp, finished_seqs, finished_scores, cache = carry
    previous = _column(live_seqs, jnp.maximum(index - 1, 0))
    previous = jnp.where(index == 0, 0, previous)
    state = DecodingState(index, previous.reshape(batch * beams, 1),
                          live_seqs.reshape(batch * beams, length), cache)
    logits, cache = tokens_to_logits(state)
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, beams, vocab)
    forced_token = _column(prompt, index)
    forced_log_probs = jnp.where(jnp.arange(vocab) == forced_token[:, None], 0.0, NEG)
    log_probs = jnp.where((forced_token != 0)[:, None, None], forced_log_probs[:, None],
                          log_probs)

    # 2k candidates: enough for k live ones even if k of them end in EOS.
    candidates = (live_logp[:, :, None] + log_probs).reshape(batch, beams * vocab)
    top_logp, top_index = jax.lax.top_k(candidates, 2 * beams)
    origin, token = top_index // vocab, top_index % vocab
    seqs = _gather_beams(live_seqs, origin)
    seqs = jax.lax.dynamic_update_slice(seqs, token[:, :, None], (0, 0, index))
    ends = (token == eos_id) & (top_logp > NEG / 2)

    live_logp, pick = jax.lax.top_k(jnp.where(ends, NEG, top_logp), beams)
    live_seqs = _gather_beams(seqs, pick)
    origin = jnp.take_along_axis(origin, pick, axis=1)

    new_finished = jnp.where(ends, top_logp / length_penalty(alpha, index + 1), NEG)
    finished_scores, pick = jax.lax.top_k(
        jnp.concatenate([finished_scores, new_finished], axis=1), beams)
    finished_seqs = _gather_beams(jnp.concatenate([finished_seqs, seqs], axis=1), pick)

    rows = (jnp.arange(batch)[:, None] * beams + origin).reshape(-1)
    cache = reorder_cache(cache, rows)
    return index + 1, live_seqs, live_logp, finished_seqs, finished_scores, cache

  first_beam_only = jnp.where(jnp.arange(beams) == 0, 0.0, NEG)
  carry = (jnp.array(0, jnp.int32), jnp.zeros((batch, beams, length), jnp.int32),
           jnp.tile(first_beam_only[None], (batch, 1)),
           jnp.zeros((batch, beams, length), jnp.int32), jnp.full((batch, beams), NEG),
           cache)
  _, live_seqs, live_logp, finished_seqs, finished_scores, _ = jax.lax.while_loop(
      cond, body, carry)
  # Beams still live ran to the maximum length: they are complete decodes too. After
  # an early exit they score at most the worst finished beam and, listed after the
  # finished ones, never displace them.
  live_scores = jnp.where(live_logp > NEG / 2, live_logp / length_penalty(alpha, length), NEG)
  scores, pick = jax.lax.top_k(jnp.concatenate([finished_scores, live_scores], axis=1), beams)
  sequences = _gather_beams(jnp.concatenate([finished_seqs, live_seqs], axis=1), pick)
  return sequences[:, ::-1], scores[:, ::-1]
