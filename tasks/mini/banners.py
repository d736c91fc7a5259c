"""Words on wide banners (2, 3 or 4 times as wide as tall): reading at the image's own shape.

Every other mini image is a 64 x 64 square, so a model that squashes its input to a square
loses nothing there. A banner is 32 px tall and 64, 96 or 128 px wide, with one word of
`text.WORDS` in a font of 18-26 px (the largest that fits, as `text.py` draws). Squashed to
the `mini` ViT's 32 x 32, a 4:1 banner's letters are a quarter as wide (3-4 px); MoME's
Pix2Struct-like tower cuts the same pixel budget (64 patches of 4 px) at the banner's own
shape, a 4 x 16 grid over the banner halved, where the letters keep their proportions
(6-8 px wide). Reading is recognising one of len(WORDS) = 24 words, so chance is 4.2% exact
match, as for `text_read`.
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import PIL.Image
import PIL.ImageDraw

from tasks.mini.common import DARK_COLORS, LIGHT_COLORS, Sample, choice
from tasks.mini.text import FONT_SIZES, MARGIN, WORDS, font

BANNER_HEIGHT = 32
ASPECT_RATIOS = (2, 3, 4)  # width / height; 4 is the Pix2Struct tower's max_aspect_ratio
QUESTIONS = ("what is written on the banner?", "what does the banner say?",
             "which word is on the banner?")


def _fits(text: str, size: int, width: int) -> bool:
  left, top, right, bottom = font(size).getbbox(text)
  return (right - left + 2 * MARGIN <= width
          and bottom - top + 2 * MARGIN <= BANNER_HEIGHT)


def render_banner(text: str, size: int, width: int, x_fraction: float,
                  foreground: tuple[int, int, int], background: tuple[int, int, int]
                  ) -> np.ndarray:
  """uint8 [BANNER_HEIGHT, width, 3]: `text` centred vertically at `x_fraction` of the room."""
  left, top, right, bottom = font(size).getbbox(text)
  x = MARGIN + x_fraction * (width - 2 * MARGIN - (right - left)) - left
  y = (BANNER_HEIGHT - (bottom - top)) / 2 - top
  image = PIL.Image.new("RGB", (width, BANNER_HEIGHT), background)
  PIL.ImageDraw.Draw(image).text((x, y), text, font=font(size), fill=foreground)
  return np.asarray(image, dtype=np.uint8)


def banner_read_samples(rng: np.random.Generator, count: int) -> Iterator[Sample]:
  for _ in range(count):
    text = choice(rng, WORDS)
    width = BANNER_HEIGHT * choice(rng, ASPECT_RATIOS)
    size = next(s for s in FONT_SIZES[int(rng.integers(2)):] if _fits(text, s, width))
    x_fraction = float(rng.random())
    foreground = DARK_COLORS[choice(rng, tuple(DARK_COLORS))]
    background = LIGHT_COLORS[choice(rng, tuple(LIGHT_COLORS))]
    yield Sample(render=functools.partial(render_banner, text, size, width, x_fraction,
                                          foreground, background),
                 question=choice(rng, QUESTIONS), answers=(text,), answer_type="other")
