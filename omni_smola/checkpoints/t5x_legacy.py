"""T5X's original (pre-Orbax) checkpoints: a msgpack index plus TensorStore arrays.

A `checkpoint_<step>/` directory holds a msgpack file named `checkpoint`:

    {"version": 3, "optimizer": {"target": {...params...},
                                 "state": {"step": ..., "param_states": {...}}}}

Each leaf is either an array stored inline (small, unpartitioned parameters, in
flax's msgpack array encoding) or the JSON of a TensorStore spec, usually zarr,
whose kvstore path is RELATIVE to the checkpoint directory (so checkpoints can be
moved), e.g. `{"driver": "zarr", "kvstore": {"driver": "file",
"path": "target.encoder.layers_0.mlp.wi_0.kernel"}, "metadata": {...}}`.
Checkpoints written to GCS name a `gcs` kvstore with a placeholder bucket;
tensorstore < 0.1.14 put `path` at the spec's top level. We read `target` only:
the optimizer state is of no use for initialisation.
"""
import os
import re
from typing import Any, Dict, Mapping, Optional

import numpy as np
import tensorstore as ts
from etils import epath
from flax import serialization

from omni_smola import param_layout
from omni_smola.checkpoints.tree import Flat, flatten

INDEX_NAME = "checkpoint"


def _is_spec(value: Any) -> bool:
  return isinstance(value, Mapping) and "driver" in value and (
      "kvstore" in value or "path" in value)


def _absolute_kvstore(spec: Mapping[str, Any], checkpoint_dir: str) -> Dict[str, Any]:
  """The spec's kvstore with its relative path resolved against the checkpoint directory."""
  kvstore = spec.get("kvstore", {})
  kvstore = {"driver": kvstore} if isinstance(kvstore, str) else dict(kvstore)
  relative = kvstore.get("path", spec.get("path"))
  if relative is None:
    raise ValueError(f"TensorStore spec without a path: {spec}")
  gcs = re.fullmatch(r"gs://([^/]+)/?(.*)", checkpoint_dir)
  if gcs:
    bucket, folder = gcs.groups()
    return {"driver": "gcs", "bucket": bucket, "path": os.path.join(folder, relative)}
  # A local copy of a GCS checkpoint still names `gcs`; `gfile` is TF's file driver.
  return {"driver": "file", "path": os.path.join(checkpoint_dir, relative)}


def _open(spec: Mapping[str, Any], checkpoint_dir: str):
  # Only the driver and the location: the stored .zarray metadata describes the
  # array, and a stale copy in the index (chunks, compressor) must not veto reading it.
  resolved = {"driver": spec["driver"], "kvstore": _absolute_kvstore(spec, checkpoint_dir)}
  return ts.open(resolved, open=True, read=True)


def read_t5x_legacy(path: str, subtree: Optional[str] = "target",
                    param_scan_axis: int = 1) -> Flat:
  """Parameters of a legacy T5X checkpoint as `{path: np.ndarray}`, one entry per layer.

  A model trained with T5X's `scan_layers` stores each stack as one `.../layers/...`
  module whose arrays carry the layers on `param_scan_axis` (T5X's default: 1); they are
  split into `layers_{i}` here, as every reader returns them (restore stacks them again
  for a scanned model).

  Args:
    path: the `checkpoint_<step>` directory or its `checkpoint` msgpack file.
    subtree: the part of the optimizer state to return ('target' are the
      parameters); None returns everything.
    param_scan_axis: the layer axis of a scanned checkpoint's stacked arrays.
  """
  index = epath.Path(path)
  index = index / INDEX_NAME if index.is_dir() else index
  if not index.exists():
    raise FileNotFoundError(f"no T5X msgpack index '{INDEX_NAME}' at {path}")
  checkpoint_dir = str(index.parent)
  contents = serialization.msgpack_restore(index.read_bytes())
  state = contents.get("optimizer", contents)
  if subtree is not None:
    if subtree not in state:
      raise KeyError(f"{index}: no '{subtree}' in the checkpoint (has {sorted(state)})")
    state = state[subtree]
  leaves = flatten(state, is_leaf=_is_spec)
  # Open every stored array first so tensorstore reads them concurrently.
  pending = {name: _open(value, checkpoint_dir) for name, value in leaves.items()
             if _is_spec(value)}
  arrays = {name: np.asarray(value) for name, value in leaves.items() if not _is_spec(value)}
  reads = {name: future.result().read() for name, future in pending.items()}
  for name, future in reads.items():
    arrays[name] = np.asarray(future.result())
  return param_layout.unstack_layers({name: arrays[name] for name in leaves},
                                     axis=param_scan_axis)
