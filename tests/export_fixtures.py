"""Tiny models with random (non-zero) weights everywhere, adapters included, for the export
tests: cheap to build (`jax.eval_shape`, then numpy), so no compiled `init`. Forwards are
jitted: one compile of a tiny model costs a third of running its operations eagerly."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np

from omni_smola.checkpoints import flatten, unflatten
from omni_smola.models import configs
from omni_smola.models.pali import Pali
from omni_smola.models.t5 import EncoderDecoder

TEXT = dataclasses.replace(configs.CONFIGS["tiny"].text, vocab_size=64)
VISION = dataclasses.replace(configs.CONFIGS["tiny"].vision, adapt=True)
ENCODER_TOKENS = np.array([[5, 9, 13, 2, 40, 7, 1, 0], [3, 62, 8, 8, 19, 25, 33, 1]])
DECODER_TOKENS = np.array([[0, 4, 17, 29, 6], [0, 50, 2, 2, 11]])
IMAGES = np.random.default_rng(0).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)


def random_params(module, *inputs, seed=0):
  """`{path: array}` of `module`'s parameters, random normal (scale 0.3), never zero."""
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)["params"]
  rng = np.random.default_rng(seed)
  flat = flatten(nn.unbox(abstract))
  return {path: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype)
          for path, s in sorted(flat.items())}


def text_model(plan, config=TEXT):
  return EncoderDecoder(config, adapters=plan)


def text_logits(plan, flat, config=TEXT):
  model = text_model(plan, config)
  apply = jax.jit(lambda params: model.apply({"params": params}, ENCODER_TOKENS, DECODER_TOKENS))
  return np.asarray(apply(unflatten(flat)))


def pali_model(plan):
  return Pali(configs.PaliConfig(text=TEXT, vision=VISION), adapters=plan)
