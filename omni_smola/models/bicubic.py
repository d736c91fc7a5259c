"""Bicubic resizing of a position-embedding grid, exactly as torch's `F.interpolate` does it.

DINOv2 and CLIP checkpoints are trained at one resolution and run at others by resizing their
patch position embeddings with `torch.nn.functional.interpolate(mode="bicubic",
align_corners=False)`; the registers variant of DINOv2 adds `antialias=True`. Parity with
those models needs torch's kernels, which `jax.image.resize("cubic")` does not reproduce
(Keys' a=-0.5 with renormalised borders, vs torch's a=-0.75 with clamped borders). Both
kernels are separable, so each axis becomes a [new, old] weight matrix built in numpy from
static shapes, and the resize is one einsum.

Letters: r/c new rows/columns, i/j old rows/columns, d width.
"""
import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np

# torch's cubic convolution coefficient (upsample_bicubic2d), and PIL's, which torch's
# antialiased path follows (`_upsample_bicubic2d_aa`).
TORCH_CUBIC_A = -0.75
ANTIALIAS_CUBIC_A = -0.5


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with coefficient `a`, support [-2, 2]."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _torch_bicubic_weights(old: int, new: int) -> np.ndarray:
  """[new, old]: torch's bicubic, align_corners=False, out-of-range taps clamped to the edge."""
  scale = old / new
  source = (np.arange(new) + 0.5) * scale - 0.5  # not clamped at 0 for cubic
  floor = np.floor(source)
  frac = source - floor
  weights = np.zeros((new, old))
  for tap in range(-1, 3):
    index = np.clip(floor + tap, 0, old - 1).astype(int)
    np.add.at(weights, (np.arange(new), index), _cubic(frac - tap, TORCH_CUBIC_A))
  return weights


def _antialias_bicubic_weights(old: int, new: int) -> np.ndarray:
  """[new, old]: torch's antialiased bicubic (PIL's): the kernel widens when shrinking."""
  scale = old / new
  support = 2.0 * max(scale, 1.0)
  inv_scale = 1.0 / max(scale, 1.0)
  weights = np.zeros((new, old))
  for out in range(new):
    center = scale * (out + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), old)
    taps = _cubic((np.arange(lo, hi) - center + 0.5) * inv_scale, ANTIALIAS_CUBIC_A)
    weights[out, lo:hi] = taps / taps.sum()
  return weights


def resize_weights(old: int, new: int, antialias: bool) -> np.ndarray:
  return (_antialias_bicubic_weights if antialias else _torch_bicubic_weights)(old, new)


def resize_square_grid(posemb, target: Sequence[int], antialias: bool = False):
  """Position embeddings of a square grid [n, d] -> [rows * cols, d], torch's bicubic.

  Computed in float32 and cast back, as transformers does.
  """
  n, width = posemb.shape
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f"position embeddings of {n} tokens are not a square grid")
  rows, cols = target
  row_weights = jnp.asarray(resize_weights(side, rows, antialias), jnp.float32)
  col_weights = jnp.asarray(resize_weights(side, cols, antialias), jnp.float32)
  grid = jnp.asarray(posemb, jnp.float32).reshape(side, side, width)
  resized = jnp.einsum("ri,cj,ijd->rcd", row_weights, col_weights, grid)
  return resized.reshape(rows * cols, width).astype(posemb.dtype)
