"""The model API the trainer and the evaluator use: t5x's four methods, nothing else.

`PaliModel` wraps the flax module (a PaLI-like `models.pali.Pali`, or a text-only
`models.t5.EncoderDecoder` when the config has no vision tower), its config, the
adapter plan and the decoding / loss settings, all gin-configurable:

    MODEL = @omni_smola.model.PaliModel()
    PaliModel.config = @PaliConfig()        # gin_configs/models/*.gin bind its fields
    PaliModel.adapters = @AdapterPlan()     # gin_configs/adapters/*.gin
    AdapterPlan.adapter = @AdapterSpec()

Batch features: `image` float32 [b, H, W, 3] in [-1, 1] (PaLI only),
`encoder_input_tokens` int32 [b, L_in], `decoder_input_tokens` and
`decoder_target_tokens` int32 [b, L_out] (inputs = targets shifted right, 0 as
BOS), `decoder_loss_weights` float32 [b, L_out], `task_id` int32 [b] (read only by
a `task_lora` specialist bank, which gathers each example's specialist by it); with a
Pix2Struct tower, `flattened_patches`, `patch_row_ids` and `patch_col_ids`
(`data.pix2struct_inputs`; without them the tower cuts the squashed image itself).
Token ids: 0 padding, 1 EOS.
"""
import re
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from omni_smola.models import configs, decoding
from omni_smola.models.attention import CROSS_ATTENTION_KV
from omni_smola.models.pali import Pali
from omni_smola.models.pix2struct_patches import FlattenedPatches
from omni_smola.models.t5 import EncoderDecoder, EncoderOutput
from omni_smola import param_layout
from omni_smola.training import program_cache
from omni_smola.nn import SLOT_NAMES, AdaptedDense, AdapterPlan, AdapterSpec
from omni_smola.nn.adapter_spec import check_sites_match
from omni_smola.nn.omni_smola import input_fusion

DECODING_METHODS = ("greedy", "sample", "beam")
TRAINABLE_MODES = ("adapters", "full")
# Bindings that only take effect when the config is built by gin (`@PaliConfig()`).
_CONFIG_CLASSES = ("PaliConfig", "T5Config", "ViTConfig", "MoVEConfig", "ADTConfig",
                   "BottleneckMoLEConfig", "DinoV2Config", "ClipVisionConfig",
                   "Pix2StructVisionConfig")
_DECODER_PARAMS = ("decoding", "temperature", "top_k", "topk", "alpha", "use_cache",
                   "max_decode_length", "eos_id", "decode_rng")


def cross_entropy_with_logits(logits, targets, label_smoothing: float = 0.0,
                              z_loss: float = 0.0):
  """Per-token (loss, z_loss) [b, L], float32; loss includes z_loss.

  Label smoothing puts `label_smoothing` mass uniformly on the other tokens and
  subtracts the smoothed target's entropy, so a perfect prediction scores 0. The
  z-loss `z_loss * logsumexp(logits)**2` keeps the softmax normaliser near 1
  (PaLM; t5x's default 1e-4).
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  entropy = -(confidence * jnp.log(confidence)
              + (vocab - 1) * low * jnp.log(low + 1e-20)) if label_smoothing else 0.0
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  target_log_prob = target_logits - log_z
  # sum_v soft_target_v log p_v without building the [b, L, vocab] one-hot.
  loss = -(confidence - low) * target_log_prob
  if label_smoothing:
    loss = loss - low * (jnp.sum(logits, axis=-1) - vocab * log_z)
  z = z_loss * jnp.square(log_z)
  return loss - entropy + z, z


def _refuse_ignored_config_bindings(name: str) -> None:
  """A named config ignores gin's config bindings: say so rather than train without them."""
  bound = [f"{cls}.{field}" for cls in _CONFIG_CLASSES
           for field in gin.get_bindings(f"omni_smola.models.configs.{cls}")]
  if bound:
    raise ValueError(
        f"PaliModel.config = {name!r} is a fixed named config, so the gin bindings "
        f"{', '.join(sorted(bound))} would be ignored; include gin_configs/models/{name}.gin "
        "(PaliModel.config = @PaliConfig()) instead of naming the config")


def _config_name(config: configs.PaliConfig) -> Optional[str]:
  """The name of the `CONFIGS` entry `config` equals, if any (for reports)."""
  return next((name for name, named in configs.CONFIGS.items() if named == config), None)


# gin configurables the layers call while tracing (not fields of the config or adapters):
# they change the programs, so they are part of `PaliModel.fingerprint`.
# tests/test_program_cache.py checks that every configurable of omni_smola/nn and
# omni_smola/models is a config class or listed here.
TRACE_TIME_SETTINGS = (("input_fusion", input_fusion),)


@gin.configurable
class PaliModel:
  """A PaLI-like (or text-only T5) encoder-decoder with adapters; t5x's model API.

  Args:
    config: a `PaliConfig` (gin: `@PaliConfig()`, fields bound by
      gin_configs/models/*.gin) or, from Python, a name in `models.configs.CONFIGS`.
    adapters: the `AdapterPlan`: the spec of each adapter slot (`adapter`; and
      `specialist_adapter`, the generalist -> specialist recipe's per-task adapter
      on top of the restored, frozen generalist). None: no adapter. From Python an
      `AdapterSpec` is short for `AdapterPlan(adapter=spec)`.
    input_vocabulary, output_vocabulary: seqio vocabularies, kept for the
      evaluator; their size must fit the model's vocabulary.
    decoding: 'greedy', 'sample' (temperature / top-k) or 'beam'.
    num_decodes: samples per example ('sample') or beam size ('beam').
    length_penalty_alpha: beam search's `((5 + len) / 6) ** alpha`.
    use_cache: decode with the KV cache (False recomputes the decoder each step).
    label_smoothing, z_loss: loss options (see `cross_entropy_with_logits`).
    loss_normalizing_factor: 'num_tokens' (the loss is the mean over weighted
      tokens), a number (sum divided by it) or None (sum).
  """

  def __init__(self, config: Union[str, configs.PaliConfig] = "tiny",
               adapters: Optional[AdapterPlan] = None, *,
               input_vocabulary: Any = None, output_vocabulary: Any = None,
               decoding: str = "greedy", temperature: float = 1.0, top_k: int = 0,
               num_decodes: int = 1, length_penalty_alpha: float = 0.6,
               use_cache: bool = True, label_smoothing: float = 0.0, z_loss: float = 1e-4,
               loss_normalizing_factor: Union[str, float, None] = "num_tokens",
               eos_id: int = 1):
    if isinstance(config, str):
      _refuse_ignored_config_bindings(config)
      self.config_name = config
      config = configs.get_config(config)
    else:
      self.config_name = _config_name(config)
    self.config = config
    if isinstance(adapters, AdapterSpec):
      adapters = AdapterPlan(adapter=adapters)
    if not isinstance(adapters, (AdapterPlan, type(None))):
      raise TypeError(f"PaliModel.adapters must be an AdapterPlan (gin: @AdapterPlan()), "
                      f"got {adapters!r}")
    self.adapters = adapters if adapters is not None else AdapterPlan()
    for vocabulary in (input_vocabulary, output_vocabulary):
      size = getattr(vocabulary, "vocab_size", None)
      if size is not None and size > config.text.vocab_size:
        raise ValueError(f"a vocabulary of {size} ids does not fit the model's "
                         f"text.vocab_size={config.text.vocab_size}")
    self.input_vocabulary = input_vocabulary
    self.output_vocabulary = output_vocabulary
    if decoding not in DECODING_METHODS:
      raise ValueError(f"PaliModel.decoding={decoding!r} is not one of {DECODING_METHODS}")
    if loss_normalizing_factor is not None and not isinstance(
        loss_normalizing_factor, (int, float)) and loss_normalizing_factor != "num_tokens":
      raise ValueError("PaliModel.loss_normalizing_factor must be 'num_tokens', a number "
                       f"or None, got {loss_normalizing_factor!r}")
    self.decoding_defaults = dict(decoding=decoding, temperature=temperature, top_k=top_k,
                                  alpha=length_penalty_alpha, use_cache=use_cache,
                                  max_decode_length=None, eos_id=eos_id)
    self.num_decodes = num_decodes
    self.label_smoothing = label_smoothing
    self.z_loss = z_loss
    self.loss_normalizing_factor = loss_normalizing_factor
    if config.vision is not None:
      self.module = Pali(config, adapters=self.adapters)
    else:
      self.module = EncoderDecoder(config.text, adapters=self.adapters)

  @property
  def fingerprint(self) -> Optional[str]:
    """What this model computes, as a value (`program_cache`): its class, config, adapters,
    decoding and loss settings, and the settings its layers read from gin while tracing
    (`TRACE_TIME_SETTINGS`). The vocabularies are the evaluator's, not the programs'."""
    return program_cache.fingerprint(
        type(self).__module__, type(self).__qualname__, self.config, self.adapters,
        self.decoding_defaults, self.num_decodes, self.label_smoothing, self.z_loss,
        self.loss_normalizing_factor, [(name, read()) for name, read in TRACE_TIME_SETTINGS])

  @property
  def has_vision(self) -> bool:
    return self.config.vision is not None

  @property
  def vocab_size(self) -> int:
    return self.config.text.vocab_size

  # ------------------------------------------------------------------ helpers

  def _encoder_inputs(self, batch) -> dict:
    inputs = {"encoder_input_tokens": batch["encoder_input_tokens"],
              "task_ids": batch.get("task_id")}
    if self.has_vision:
      inputs["image"] = batch["image"]
    if "flattened_patches" in batch:
      if self.config.pix2struct_patching is None:
        raise ValueError("the batch carries Pix2Struct patches (`flattened_patches`) but the "
                         "model has no Pix2Struct tower to read them: its pipeline was built "
                         "for another model")
      inputs["patches"] = FlattenedPatches(batch["flattened_patches"], batch["patch_row_ids"],
                                           batch["patch_col_ids"])
    return inputs

  def _apply(self, params, *args, **kwargs):
    return self.module.apply({"params": params}, *args, **kwargs)

  def _logits(self, params, batch, dropout_rng=None, mutable=False):
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return self._apply(params, **self._encoder_inputs(batch),
                       decoder_input_tokens=batch["decoder_input_tokens"],
                       decoder_target_tokens=batch.get("decoder_target_tokens"),
                       enable_dropout=dropout_rng is not None, rngs=rngs, mutable=mutable)

  def encode(self, params, batch) -> EncoderOutput:
    """Runs the image and prompt encoder once: what decoding starts from."""
    return self._apply(params, **self._encoder_inputs(batch), method="encode")

  @staticmethod
  def _weights(batch):
    if "decoder_loss_weights" in batch and batch["decoder_loss_weights"] is not None:
      return batch["decoder_loss_weights"].astype(jnp.float32)
    return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)

  # ------------------------------------------------------------------ t5x API

  def get_initial_variables(self, rng, input_shapes: Mapping[str, Tuple[int, ...]],
                            input_types: Optional[Mapping[str, Any]] = None):
    """Fresh variables (`{'params': ...}`, boxed with logical axis names)."""
    input_types = dict(input_types or {})
    encoder_shape = tuple(input_shapes["encoder_input_tokens"])
    decoder_shape = tuple(input_shapes.get("decoder_input_tokens",
                                           input_shapes.get("decoder_target_tokens")))
    inputs = {
        "encoder_input_tokens": jnp.ones(encoder_shape,
                                         input_types.get("encoder_input_tokens", jnp.int32)),
        "decoder_input_tokens": jnp.ones(decoder_shape,
                                         input_types.get("decoder_input_tokens", jnp.int32)),
        # Any id will do: a specialist bank creates its parameters whatever the rows.
        "task_ids": jnp.zeros(encoder_shape[:1], jnp.int32),
    }
    if self.has_vision:
      size = self.config.vision.image_size
      image_shape = tuple(input_shapes.get("image", (encoder_shape[0], size, size, 3)))
      inputs["image"] = jnp.zeros(image_shape, input_types.get("image", jnp.float32))
    adaptable = {slot: [] for slot in SLOT_NAMES}

    def record_projection(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name == "__call__" and isinstance(module, AdaptedDense):
        for slot, _ in module.plan.items():
          adaptable[slot].append(module.path_name)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record_projection):
      variables = self.module.init({"params": rng}, **inputs, enable_dropout=False)
    for slot, spec in self.adapters.items():
      check_sites_match(slot, spec, sorted(set(adaptable[slot])))
    return variables

  def loss_fn(self, params, batch, dropout_rng):
    """(scalar loss, metrics); metrics are sums over the batch's tokens.

    metrics: `loss` and `z_loss` (weighted sums), `accuracy` (weighted count of
    correct argmax tokens: divide by `num_tokens`), `num_tokens` (sum of
    weights), `num_examples`. `dropout_rng=None` runs deterministically.
    """
    logits = self._logits(params, batch, dropout_rng)
    targets = batch["decoder_target_tokens"]
    weights = self._weights(batch)
    token_loss, token_z = cross_entropy_with_logits(logits, targets, self.label_smoothing,
                                                    self.z_loss)
    total = jnp.sum(token_loss * weights)
    num_tokens = jnp.sum(weights)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {
        "loss": total,
        "z_loss": jnp.sum(token_z * weights),
        "accuracy": jnp.sum(correct * weights),
        "num_tokens": num_tokens,
        "num_examples": jnp.asarray(targets.shape[0], jnp.float32),
    }
    if self.loss_normalizing_factor == "num_tokens":
      loss = total / jnp.maximum(num_tokens, 1.0)
    elif self.loss_normalizing_factor is None:
      loss = total
    else:
      loss = total / self.loss_normalizing_factor
    return loss, metrics

  def score_batch(self, params, batch, return_intermediates: bool = False):
    """[b] log-likelihood of `decoder_target_tokens` (weighted by the loss weights).

    With `return_intermediates`, also the `intermediates` collection (named
    activations and adapter routing statistics) plus `token_scores` [b, L].
    """
    if return_intermediates:
      logits, state = self._logits(params, batch, mutable=["intermediates"])
    else:
      logits = self._logits(params, batch)
    log_probs = jax.nn.log_softmax(logits)
    targets = batch["decoder_target_tokens"]
    token_scores = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    token_scores = token_scores * self._weights(batch)
    scores = jnp.sum(token_scores, axis=-1)
    if not return_intermediates:
      return scores
    intermediates = dict(state.get("intermediates", {}))
    intermediates["token_scores"] = token_scores
    return scores, intermediates

  def predict_batch_with_aux(self, params, batch, rng=None, decoder_params=None,
                             return_all_decodes: bool = False,
                             num_decodes: Optional[int] = None,
                             prompt_with_targets: bool = False):
    """Decodes `batch`: (tokens [b, L], {'scores': [b]}).

    With `return_all_decodes`: tokens [b, n, L] and scores [b, n], sorted by
    score in increasing order (best last, as t5x). `num_decodes` (default: the
    constructor's) is the number of samples or the beam size. `decoder_params`
    overrides per call: decoding, temperature, top_k, alpha, use_cache,
    max_decode_length, eos_id, decode_rng. `prompt_with_targets` forces the
    non-zero `decoder_input_tokens` after BOS as the first outputs.
    L is `max_decode_length`, default the length of `decoder_input_tokens`.
    """
    options = dict(self.decoding_defaults)
    for key, value in dict(decoder_params or {}).items():
      if key not in _DECODER_PARAMS:
        raise ValueError(f"unknown decoder_params key {key!r}; known: {_DECODER_PARAMS}")
      options["top_k" if key == "topk" else key] = value
    decode_rng = options.pop("decode_rng", None)
    rng = decode_rng if rng is None else rng
    method = options["decoding"]
    if method not in DECODING_METHODS:
      raise ValueError(f"decoding={method!r} is not one of {DECODING_METHODS}")
    num_decodes = self.num_decodes if num_decodes is None else num_decodes
    if method == "greedy":
      num_decodes = 1

    decoder_inputs = batch["decoder_input_tokens"]
    batch_size = decoder_inputs.shape[0]
    length = options["max_decode_length"] or decoder_inputs.shape[1]
    prompt = jnp.zeros((batch_size, length), jnp.int32)
    if prompt_with_targets:
      # Output i is decoder input i + 1 (inputs are the targets shifted right).
      forced = decoder_inputs[:, 1:length + 1].astype(jnp.int32)
      prompt = prompt.at[:, :forced.shape[1]].set(forced)

    encoder_output = self.encode(params, batch)
    if num_decodes > 1:
      encoder_output = jax.tree_util.tree_map(
          lambda x: jnp.repeat(x, num_decodes, axis=0), encoder_output)
    tokens_to_logits, cache = self._tokens_to_logits(params, encoder_output, length,
                                                     options["use_cache"])
    if method == "beam":
      sequences, scores = decoding.beam_search(
          tokens_to_logits, cache, prompt, beam_size=num_decodes, alpha=options["alpha"],
          eos_id=options["eos_id"], reorder_cache=self._reorder_cache)
    else:
      if method == "sample" and rng is None:
        rng = jax.random.PRNGKey(0)
      sequences, scores = decoding.temperature_sample(
          tokens_to_logits, cache, jnp.repeat(prompt, num_decodes, axis=0), rng=rng,
          temperature=options["temperature"] if method == "sample" else 0.0,
          top_k=options["top_k"], eos_id=options["eos_id"])
      sequences = sequences.reshape(batch_size, num_decodes, length)
      scores = scores.reshape(batch_size, num_decodes)
      order = jnp.argsort(scores, axis=1)
      sequences = jnp.take_along_axis(sequences, order[:, :, None], axis=1)
      scores = jnp.take_along_axis(scores, order, axis=1)
    if return_all_decodes:
      return sequences, {"scores": scores}
    return sequences[:, -1], {"scores": scores[:, -1]}

  def _tokens_to_logits(self, params, encoder_output: EncoderOutput, length: int,
                        use_cache: bool):
    """The per-step function the decoding loops call, and its initial cache."""
    rows = encoder_output.encoded.shape[0]
    if not use_cache:
      def recompute(state: decoding.DecodingState):
        inputs = jnp.concatenate([jnp.zeros((rows, 1), jnp.int32), state.sequences[:, :-1]],
                                 axis=1)
        logits = self._apply(params, encoder_output, inputs, method="decode")
        return jax.lax.dynamic_index_in_dim(logits, state.index, axis=1,
                                            keepdims=False), state.cache
      return recompute, ()

    # The first call fills both collections; the cross-attention keys and values are then
    # constants of every step (never carried, never reordered by beam search).
    _, variables = self._apply(params, encoder_output, jnp.zeros((rows, length), jnp.int32),
                               decode=True, max_decode_length=length,
                               mutable=["cache", CROSS_ATTENTION_KV], method="decode")
    cross_attention_kv = variables.get(CROSS_ATTENTION_KV, {})

    def step(state: decoding.DecodingState):
      logits, mutated = self.module.apply(
          {"params": params, "cache": state.cache, CROSS_ATTENTION_KV: cross_attention_kv},
          encoder_output, state.token, decode=True, max_decode_length=length,
          mutable=["cache"], method="decode")
      return logits[:, 0], mutated["cache"]
    return step, variables["cache"]

  @staticmethod
  def _reorder_cache(cache, rows):
    """Beam search's row reorder; a scanned stack's cache has its layers first."""
    def take(path, x):
      if not x.ndim:
        return x
      axis = 1 if any(getattr(k, "key", None) in param_layout.STACKS for k in path) else 0
      return jnp.take(x, rows, axis=axis)
    return jax.tree_util.tree_map_with_path(take, cache)

  # ------------------------------------------------------------------ freezing

  def trainable_mask(self, params, mode: str = "adapters",
                     overrides: Sequence[Tuple[str, bool]] = ()):
    """A pytree of bools shaped like `params` (flax boxes count as leaves).

    mode 'adapters': parameters under an adapter slot's module (`adapter`,
    `specialist_adapter`: `AdapterPlan`'s slots) train, the backbone is frozen
    (the specialist recipe freezes the generalist's `adapter` with an override);
    'full': everything trains. `overrides` are (regex, trainable) pairs
    searched in '/'-joined paths such as `text/encoder/layers_0/mlp/wi_0/kernel`;
    the first match wins over the mode.
    """
    if mode not in TRAINABLE_MODES:
      raise ValueError(f"trainable_mask mode={mode!r} is not one of {TRAINABLE_MODES}")
    rules = [(re.compile(pattern), bool(value)) for pattern, value in overrides]

    def trainable(path, _):
      name = param_layout.path_name(path)
      for pattern, value in rules:
        if pattern.search(name):
          return value
      return mode == "full" or param_layout.is_adapter_path(path)

    return jax.tree_util.tree_map_with_path(trainable, params, is_leaf=param_layout.is_box)
