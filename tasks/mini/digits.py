"""Handwritten digits (scikit-learn's `load_digits`, shipped with the package), re-drawn.

Each 8x8 digit is scaled, placed and coloured at random on a 64x64 canvas, so the 1,797
originals yield as many examples as a split needs. Splits use disjoint originals: a digit
seen in training never appears, however re-drawn, in validation or test.

The draws are kept within what the `mini` model (a 2-layer ViT seeing 32 px in 8 px patches)
learns from its own task in a few hundred steps: the first version (digits 28-56 px anywhere
on the canvas, ink lighter or darker than the ground, +-15 degrees) stayed at chance (8.2%
exact match after 300 steps alone, chance 10%). Now the digit fills most of the canvas
(44-60 px, so 22-30 px of the 32 the model sees), is drawn dark on light and turned at most
10 degrees. Labels are near-uniform over 0-9: chance is 10% (11% for the most common label).
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import PIL.Image

from tasks.mini.common import DARK_COLORS, IMAGE_SIZE, LIGHT_COLORS, Sample, choice

QUESTIONS = ("what digit is this?", "which digit is shown?", "what number is written here?")
# Fractions of the 1,797 originals in train / validation / test.
_SPLIT_BOUNDS = {"train": (0.0, 0.7), "validation": (0.7, 0.85), "test": (0.85, 1.0)}


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def render_digit(index: int, size: int, x: int, y: int, angle: float,
                 foreground: tuple[int, int, int], background: tuple[int, int, int]) -> np.ndarray:
  images, _ = _digits()
  ink = PIL.Image.fromarray((images[index] * 255).astype(np.uint8), mode="L")
  ink = ink.resize((size, size), PIL.Image.BILINEAR).rotate(angle, PIL.Image.BILINEAR)
  alpha = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
  alpha[y:y + size, x:x + size] = np.asarray(ink, np.float32) / 255.0
  alpha = alpha[..., None]
  image = alpha * np.asarray(foreground, np.float32) + (1 - alpha) * np.asarray(background,
                                                                                  np.float32)
  return np.round(image).astype(np.uint8)


def digit_samples(rng: np.random.Generator, count: int, split: str) -> Iterator[Sample]:
  images, labels = _digits()
  low, high = _SPLIT_BOUNDS[split]
  first, last = int(low * len(images)), int(high * len(images))
  for _ in range(count):
    index = int(rng.integers(first, last))
    size = int(rng.integers(44, 61))
    x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
    angle = float(rng.uniform(-10, 10))
    foreground = choice(rng, tuple(DARK_COLORS.values()))
    background = choice(rng, tuple(LIGHT_COLORS.values()))
    yield Sample(render=functools.partial(render_digit, index, size, x, y, angle, foreground,
                                          background),
                 question=choice(rng, QUESTIONS), answers=(str(labels[index]),),
                 answer_type="number", image_key=f"digit{index}")
