"""Rendered words and numbers on coloured backgrounds: reading questions and captions.

Drawn with Pillow's built-in font (no font files, no network). Reading needs the finest
detail of any mini task; the captions also need the colours.

Legibility sets the sizes: the `mini` model sees the 64 px render resized to 32 px, where
glyphs of the first version (fonts 10-16 px, words and numbers up to "zebra 97") were 2-4 px
tall and no model, specialist included, read a single one (0% exact match). Now one word of
`WORDS`, dark on light, in a font of 18-26 px (9-13 px at 32): reading is recognising one of
len(WORDS) = 24 words, uniformly drawn, so chance is 1/24 = 4.2% exact match.
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from tasks.mini.common import DARK_COLORS, IMAGE_SIZE, LIGHT_COLORS, Sample, choice

WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "bread", "house", "music", "snow", "train",
    "water", "zebra", "fish", "moon", "rain", "tree", "book", "cake", "star", "ship", "cat",
    "dog", "sky", "bus",
)
READ_QUESTIONS = ("what is written in the image?", "what does the text say?",
                  "what does the sign say?")
FONT_SIZES = (26, 22, 18)
MARGIN = 2


@functools.lru_cache(maxsize=None)
def font(size: int) -> PIL.ImageFont.FreeTypeFont:
  return PIL.ImageFont.load_default(size=size)


def _fits(text: str, size: int, canvas: tuple[int, int]) -> bool:
  left, top, right, bottom = font(size).getbbox(text)
  canvas_width, canvas_height = canvas
  return (right - left + 2 * MARGIN <= canvas_width
          and bottom - top + 2 * MARGIN <= canvas_height)


def draw_font_size(rng: np.random.Generator, text: str,
                   canvas: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> int:
  """The largest of FONT_SIZES, from the first or (at random) the second, that fits `text`
  within MARGIN on a (width, height) `canvas`."""
  return next(s for s in FONT_SIZES[int(rng.integers(2)):] if _fits(text, s, canvas))


def render_text(text: str, size: int, x_fraction: float, y_fraction: float,
                foreground: tuple[int, int, int], background: tuple[int, int, int],
                canvas: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> np.ndarray:
  """uint8 [height, width, 3] of a (width, height) `canvas`: `text` placed at the fractions
  of the room left around it."""
  face = font(size)
  left, top, right, bottom = face.getbbox(text)
  width, height = right - left, bottom - top
  canvas_width, canvas_height = canvas
  x = MARGIN + x_fraction * (canvas_width - 2 * MARGIN - width) - left
  y = MARGIN + y_fraction * (canvas_height - 2 * MARGIN - height) - top
  image = PIL.Image.new("RGB", canvas, background)
  PIL.ImageDraw.Draw(image).text((x, y), text, font=face, fill=foreground)
  return np.asarray(image, dtype=np.uint8)


def _text_draws(rng: np.random.Generator, count: int):
  for _ in range(count):
    text = choice(rng, WORDS)
    size = draw_font_size(rng, text)
    x_fraction, y_fraction = float(rng.random()), float(rng.random())
    fg_name, bg_name = choice(rng, tuple(DARK_COLORS)), choice(rng, tuple(LIGHT_COLORS))
    foreground, background = DARK_COLORS[fg_name], LIGHT_COLORS[bg_name]
    render = functools.partial(render_text, text, size, x_fraction, y_fraction, foreground,
                               background)
    yield render, text, fg_name, bg_name


def text_read_samples(rng: np.random.Generator, count: int) -> Iterator[Sample]:
  for render, text, _, _ in _text_draws(rng, count):
    yield Sample(render=render, question=choice(rng, READ_QUESTIONS), answers=(text,),
                 answer_type="other")


def text_caption_samples(rng: np.random.Generator, count: int) -> Iterator[Sample]:
  for render, text, fg_name, bg_name in _text_draws(rng, count):
    references = (f"the word {text} written in {fg_name} on {bg_name}",
                  f"{fg_name} text that says {text}",
                  f"a {bg_name} sign that says {text}")
    yield Sample(render=render, question="", answers=references)
