"""The spread every study figure carries: mean and sample standard deviation over seeds."""
from typing import Dict, Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> Dict[str, float]:
  """{"mean", "std" (ddof 1; 0 for one value), "n"}."""
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()),
          "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0, "n": int(len(values))}
