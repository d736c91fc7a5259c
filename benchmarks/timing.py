"""Timing helpers for benchmarks: interleaved repeats, median, same-run baselines.

Absolute times on shared machines are noise, so every benchmark reports ratios
against a baseline timed in the same process, with the runs of each case
interleaved so that a slow patch of the machine hits every case alike.
"""
import statistics
import time
from typing import Callable, Dict, List

import jax


def time_once(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def interleaved_samples(cases: Dict[str, Callable[[], object]], repeats: int = 15,
                        warmup: int = 2) -> Dict[str, List[float]]:
  """Seconds per run of each case, the cases run round-robin."""
  for fn in cases.values():
    for _ in range(warmup):
      time_once(fn)
  samples = {name: [] for name in cases}
  for _ in range(repeats):
    for name, fn in cases.items():
      samples[name].append(time_once(fn))
  return samples


def interleaved_medians(cases, repeats: int = 15, warmup: int = 2) -> Dict[str, float]:
  """Median seconds per case: for steps long enough to average over noise."""
  samples = interleaved_samples(cases, repeats, warmup)
  return {name: statistics.median(times) for name, times in samples.items()}


def interleaved_minimums(cases, repeats: int = 15, warmup: int = 2) -> Dict[str, float]:
  """Fastest run per case: for millisecond kernels, where interference from
  other processes only ever adds time, so the minimum is the stable estimate
  (the advice of Python's `timeit`)."""
  samples = interleaved_samples(cases, repeats, warmup)
  return {name: min(times) for name, times in samples.items()}
