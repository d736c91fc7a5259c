"""T5.1.1 / UL2 encoder-decoder with the adapter hook on every projection.

Usable alone (text only): `EncoderDecoder(config)(encoder_input_tokens,
decoder_input_tokens) -> logits`, `.encode(tokens) -> EncoderOutput`,
`.decode(encoder_output, decoder_input_tokens) -> logits`. The PaLI model nests
one under `text/` and passes visual tokens to `encode`.

Numerics follow T5.1.1 as `transformers`' `T5ForConditionalGeneration` computes it:
RMSNorm (eps 1e-6, statistics in float32), gated GELU with the tanh
approximation (`gelu_new`), attention logits NOT scaled by 1/sqrt(head_dim) (T5
folds it into the query initialisation), relative position buckets shared by
all layers of a stack (bidirectional in the encoder, causal in the decoder),
no biases, tied logits rescaled by d_model**-0.5.

Parameters, in T5X's layout so T5X checkpoints map one to one (`{i}` a layer):
    token_embedder/embedding                                  [vocab, embed]
    encoder/relpos_bias/rel_embedding                         [heads, buckets]
    encoder/layers_{i}/pre_attention_layer_norm/scale         [embed]
    encoder/layers_{i}/attention/{query,key,value}/kernel     [embed, heads, kv]
    encoder/layers_{i}/attention/out/kernel                   [heads, kv, embed]
    encoder/layers_{i}/pre_mlp_layer_norm/scale               [embed]
    encoder/layers_{i}/mlp/{wi_0,wi_1}/kernel                 [embed, mlp]
    encoder/layers_{i}/mlp/wo/kernel                          [mlp, embed]
    encoder/encoder_norm/scale                                [embed]
    decoder/relpos_bias/rel_embedding                         [heads, buckets]
    decoder/layers_{i}/pre_self_attention_layer_norm/scale
    decoder/layers_{i}/self_attention/{query,key,value,out}/kernel
    decoder/layers_{i}/pre_cross_attention_layer_norm/scale
    decoder/layers_{i}/encoder_decoder_attention/{query,key,value,out}/kernel
    decoder/layers_{i}/pre_mlp_layer_norm/scale
    decoder/layers_{i}/mlp/{wi_0,wi_1,wo}/kernel
    decoder/decoder_norm/scale                                [embed]
    decoder/logits_dense/kernel                               [embed, vocab] (untied only)
Adapters add `.../{projection}/{slot}/...` (`adapter`, `specialist_adapter`: the
`AdapterPlan`'s slots). `AdapterSpec.sites` match the projection's parameter path: the
path above under whatever encloses the model, e.g. `text/encoder/layers_0/mlp/wi_0` in
PaLI. The output projection `logits_dense` is never adapted.

Token contexts: encoder projections see the encoder tokens' context (padding,
`[visual; text]` layout). Decoder projections see a causal context routing
instance-level adapters on the encoder's mean output, except the cross
attention's key/value projections, which act on encoder tokens and so see the
encoder's context.
"""
import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax.numpy as jnp

from omni_smola.models import layer_stack
from omni_smola.models.attention import MultiHeadAttention
from omni_smola.models.configs import T5Config
from omni_smola.models.layers import Embed, RMSNorm, constrain
from omni_smola.models.relative_position import RelativePositionBias
from omni_smola.nn import NO_ADAPTERS, AdaptedDense, AdapterPlan, TokenContext
from omni_smola.nn.instruction_router import prompt_embedding
from omni_smola.nn.mome_mole import BottleneckMoLE

_MLP_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


@flax.struct.dataclass
class EncoderOutput:
  """What the decoder needs from the encoder; every leaf has the batch first.

  Attributes:
    encoded: [b, L_enc, embed] encoder output tokens.
    context: the encoder tokens' `TokenContext` (padding, visual layout).
    instance_features: [b, embed] float32 mean of `encoded` over valid tokens:
      what the decoder's instance-level adapters route on.
  """
  encoded: jnp.ndarray
  context: TokenContext
  instance_features: jnp.ndarray


def masked_mean(x, valid):
  """[b, t, d], [b, t] -> [b, d] float32 mean over valid tokens."""
  valid = valid.astype(jnp.float32)
  total = jnp.einsum("btd,bt->bd", x.astype(jnp.float32), valid)
  return total / jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1.0)


GATE_ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=True),  # T5.1.1 (`gelu_new`)
    "silu": nn.silu,  # UL2
}


class MlpBlock(nn.Module):
  """Gated MLP: `wo(act(wi_0 x) * wi_1 x)`, act GELU (T5.1.1) or SiLU (UL2)."""
  mlp_dim: int
  activation: str = "gelu"
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32

  def _dense(self, name, features, axes):
    return AdaptedDense(features=features, kernel_axes=axes, dtype=self.dtype,
                        kernel_init=_MLP_INIT, name=name)

  @nn.compact
  def __call__(self, x, context: TokenContext):
    gate = self._dense("wi_0", self.mlp_dim, ("embed", "mlp"))(x, context)
    linear = self._dense("wi_1", self.mlp_dim, ("embed", "mlp"))(x, context)
    if self.activation not in GATE_ACTIVATIONS:
      raise ValueError(f"T5Config.mlp_activation={self.activation!r} is not one of "
                       f"{sorted(GATE_ACTIVATIONS)}")
    hidden = GATE_ACTIVATIONS[self.activation](gate) * linear
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=self.deterministic)
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    return self._dense("wo", x.shape[-1], ("mlp", "embed"))(hidden, context)


class _Layer(nn.Module):
  config: T5Config
  deterministic: bool = True
  decode: bool = False

  def norm(self, name):
    return RMSNorm(self.config.layer_norm_epsilon, self.config.activation_dtype, name=name)

  def attention(self, name, **kw):
    cfg = self.config
    return MultiHeadAttention(cfg.num_heads, cfg.head_dim, dropout_rate=cfg.dropout_rate,
                              deterministic=self.deterministic, dtype=cfg.activation_dtype,
                              name=name, **kw)

  def mlp(self, x, context):
    cfg = self.config
    y = MlpBlock(cfg.mlp_dim, activation=cfg.mlp_activation, dropout_rate=cfg.dropout_rate, deterministic=self.deterministic,
                 dtype=cfg.activation_dtype, name="mlp")(x, context)
    if cfg.mome_mole is None:
      return y
    # MoME's MoLE, beside the FFN on its input, routed on the instruction (docs/DESIGN.md §3.7).
    return y + BottleneckMoLE(**dataclasses.asdict(cfg.mome_mole), dtype=cfg.activation_dtype,
                              name="mome_mole")(x, context)

  def residual(self, x, y):
    y = nn.Dropout(self.config.dropout_rate)(y, deterministic=self.deterministic)
    return constrain(x + y)


class EncoderLayer(_Layer):

  @nn.compact
  def __call__(self, x, context, mask, bias):
    y = self.norm("pre_attention_layer_norm")(x)
    x = self.residual(x, self.attention("attention")(y, y, context, context, mask, bias))
    y = self.norm("pre_mlp_layer_norm")(x)
    return self.residual(x, self.mlp(y, context))


class DecoderLayer(_Layer):

  @nn.compact
  def __call__(self, x, encoded, context, encoder_context, mask, bias, cross_mask,
               decode_position=None):
    y = self.norm("pre_self_attention_layer_norm")(x)
    y = self.attention("self_attention", decode=self.decode)(
        y, y, context, context, mask, bias, decode_position)
    x = self.residual(x, y)
    y = self.norm("pre_cross_attention_layer_norm")(x)
    y = self.attention("encoder_decoder_attention", decode=self.decode,
                       cache_inputs_kv=True)(y, encoded, context, encoder_context, cross_mask)
    x = self.residual(x, y)
    y = self.norm("pre_mlp_layer_norm")(x)
    return self.residual(x, self.mlp(y, context))


def _relpos(cfg: T5Config):
  return RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                              cfg.relative_attention_max_distance, name="relpos_bias")


class Encoder(nn.Module):
  """Embedded tokens [b, L, embed] -> encoded [b, L, embed]."""
  config: T5Config

  @nn.compact
  def __call__(self, x, context: TokenContext, enable_dropout: bool = False) -> jnp.ndarray:
    cfg = self.config
    batch, length = x.shape[:2]
    bias = _relpos(cfg)(length, length, bidirectional=True)
    mask = context.valid_mask(batch, length)[:, None, None, :]
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not enable_dropout)
    x = constrain(x.astype(cfg.activation_dtype))
    x = layer_stack.apply_layers(
        self, EncoderLayer, x, context, mask, bias, num_layers=cfg.num_encoder_layers,
        name="layers", scan=cfg.scan_layers, remat=cfg.remat, remat_policy=cfg.remat_policy,
        config=cfg, deterministic=not enable_dropout)
    x = RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="encoder_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not enable_dropout)
    return constrain(x)


class Decoder(nn.Module):
  """Decoder input tokens -> float32 logits [b, L, vocab] (see `__call__`)."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoder_output: EncoderOutput, decoder_input_tokens,
               enable_dropout: bool = False, decode: bool = False,
               max_decode_length: Optional[int] = None, decoder_target_tokens=None):
    """Teacher-forced logits, or one decoding step.

    `decoder_target_tokens` (teacher forcing only) marks the decoder's padding
    for the adapters, as t5x does (`targets > 0`): routing statistics then skip
    padded positions. Without it every position counts as valid.

    With `decode=True` the first call creates the cache (`cache_index` and each
    layer's keys/values, for `max_decode_length` positions, which must then be
    the length of `decoder_input_tokens`) and computes as without it; later calls
    take one token [b, 1] at position `cache_index` and return its logits [b, 1, V].
    """
    cfg = self.config
    batch, length = decoder_input_tokens.shape
    deterministic = not enable_dropout
    relpos = _relpos(cfg)
    decode_position = None
    if decode:
      initialized = self.has_variable("cache", "cache_index")
      index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if initialized:
        if max_decode_length is None:
          raise ValueError("decoding with the cache needs max_decode_length")
        decode_position = index.value
        index.value = decode_position + 1
        bias = relpos(1, max_decode_length, bidirectional=False,
                      query_position=decode_position)
        mask = (jnp.arange(max_decode_length) <= decode_position)[None, None, None, :]
      elif max_decode_length not in (None, length):
        raise ValueError(f"the cache-initialising call takes max_decode_length="
                         f"{max_decode_length} tokens, got {length}")
    if decode_position is None:
      bias = relpos(length, length, bidirectional=False)
      mask = jnp.tril(jnp.ones((length, length), bool))[None, None]

    encoded = encoder_output.encoded
    encoder_context = encoder_output.context
    cross_mask = encoder_context.valid_mask(*encoded.shape[:2])[:, None, None, :]
    valid = None if decoder_target_tokens is None else decoder_target_tokens > 0
    context = TokenContext(valid=valid, causal=True,
                           instance_features=encoder_output.instance_features,
                           task_ids=encoder_context.task_ids)

    x = self.shared_embedding(decoder_input_tokens)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = constrain(x.astype(cfg.activation_dtype))
    x = layer_stack.apply_layers(
        self, DecoderLayer, x, encoded, context, encoder_context, mask, bias, cross_mask,
        decode_position, num_layers=cfg.num_decoder_layers, name="layers",
        scan=cfg.scan_layers, remat=cfg.remat and not decode, remat_policy=cfg.remat_policy,
        config=cfg, deterministic=deterministic, decode=decode)
    x = RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="decoder_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = constrain(x)
    self.sow("intermediates", "pre_logits", x)
    # The output projection runs in float32 whatever the activation dtype, as t5x's: in
    # bfloat16 (8 bits of mantissa) a 250k-way softmax loses its small logits.
    x = x.astype(jnp.float32)
    if cfg.logits_via_embedding:
      logits = self.shared_embedding.attend(x * jnp.float32(cfg.emb_dim ** -0.5))
    else:
      logits = AdaptedDense(cfg.vocab_size, kernel_axes=("embed", "vocab"),
                            adapters=NO_ADAPTERS, dtype=jnp.float32, name="logits_dense")(x)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class EncoderDecoder(nn.Module):
  """T5.1.1 / UL2 with the adapter hook; `visual_tokens` make it PaLI's text side.

  `adapters` is the plan every projection reads (`AdaptedDense.plan`); as the root
  of a text-only model or nested in PaLI (which then holds the plan) alike.
  """
  config: T5Config
  adapters: Optional[AdapterPlan] = None

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens, visual_tokens=None, *, task_ids=None,
             enable_dropout: bool = False) -> EncoderOutput:
    """Prompt tokens [b, L_in] (0 = padding), optionally after visual tokens [b, n, embed].

    `task_ids` [b] (the batch's `task_id`) reach every adapter, the decoder's through
    the returned context: what a `task_lora` bank gathers its specialists by.
    """
    x = self.token_embedder(encoder_input_tokens)
    valid = encoder_input_tokens > 0
    # With MoME's MoLE every instance-level router (encoder and decoder) reads the
    # instruction embedding; otherwise the encoder's own tokens, the decoder their mean.
    instruction = (prompt_embedding(x, valid) if self.config.mome_mole is not None
                   else None)
    if visual_tokens is None:
      context = TokenContext(valid=valid, task_ids=task_ids, instance_features=instruction)
    else:
      batch, num_visual = visual_tokens.shape[:2]
      x = jnp.concatenate([visual_tokens.astype(x.dtype), x], axis=1)
      ones = jnp.ones((batch, num_visual), bool)
      context = TokenContext(valid=jnp.concatenate([ones, valid], axis=1),
                             visual=jnp.concatenate([ones, jnp.zeros_like(valid)], axis=1),
                             num_visual_tokens=num_visual, task_ids=task_ids,
                             instance_features=instruction)
    encoded = self.encoder(x, context, enable_dropout)
    self.sow("intermediates", "encoded", encoded)
    return EncoderOutput(encoded, context, masked_mean(encoded, context.valid)
                         if instruction is None else instruction)

  def instruction(self, encoder_input_tokens):
    """[b, emb] float32: MoME's instruction embedding, the prompt's mean token embedding.

    Reads the prompt alone (never the image or the targets), so routing on it is causal-safe.
    """
    return prompt_embedding(self.token_embedder(encoder_input_tokens), encoder_input_tokens > 0)

  def decode(self, encoder_output: EncoderOutput, decoder_input_tokens, *,
             enable_dropout: bool = False, decode: bool = False,
             max_decode_length: Optional[int] = None, decoder_target_tokens=None):
    return self.decoder(encoder_output, decoder_input_tokens, enable_dropout, decode,
                        max_decode_length, decoder_target_tokens)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, *, task_ids=None,
               enable_dropout: bool = False, decoder_target_tokens=None):
    encoder_output = self.encode(encoder_input_tokens, task_ids=task_ids,
                                 enable_dropout=enable_dropout)
    return self.decode(encoder_output, decoder_input_tokens, enable_dropout=enable_dropout,
                       decoder_target_tokens=decoder_target_tokens)
