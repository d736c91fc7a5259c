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

from tasks.mini.common import DARK_COLORS, LIGHT_COLORS, Sample, choice
from tasks.mini.text import WORDS, draw_font_size, render_text

BANNER_HEIGHT = 32
ASPECT_RATIOS = (2, 3, 4)  # width / height; 4 is the Pix2Struct tower's max_aspect_ratio
QUESTIONS = ("what is written on the banner?", "what does the banner say?",
             "which word is on the banner?")


def banner_read_samples(rng: np.random.Generator, count: int) -> Iterator[Sample]:
  for _ in range(count):
    text = choice(rng, WORDS)
    canvas = (BANNER_HEIGHT * choice(rng, ASPECT_RATIOS), BANNER_HEIGHT)  # (width, height)
    size = draw_font_size(rng, text, canvas)
    x_fraction = float(rng.random())
    foreground = DARK_COLORS[choice(rng, tuple(DARK_COLORS))]
    background = LIGHT_COLORS[choice(rng, tuple(LIGHT_COLORS))]
    # Centred vertically: `text.render_text` at half the room above and below.
    yield Sample(render=functools.partial(render_text, text, size, x_fraction, 0.5, foreground,
                                          background, canvas),
                 question=choice(rng, QUESTIONS), answers=(text,), answer_type="other")
