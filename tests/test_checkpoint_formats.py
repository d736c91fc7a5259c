"""Each checkpoint format, written here by hand in its documented layout, reads back exactly."""
import json
import os

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
from flax import serialization

from omni_smola.checkpoints import (detect_format, read_big_vision_npz, read_checkpoint,
                                    read_orbax, read_safetensors, read_t5x_legacy)

RNG = np.random.default_rng(0)


def _params():
  return {
      "token_embedder/embedding": RNG.normal(size=(16, 8)).astype(np.float32),
      "encoder/layers_0/attention/query/kernel": RNG.normal(size=(8, 2, 4)).astype(np.float32),
      "encoder/layers_0/mlp/wi_0/kernel": RNG.normal(size=(8, 12)).astype(np.float32),
      "encoder/encoder_norm/scale": RNG.normal(size=(8,)).astype(np.float32),
      "encoder/relpos_bias/rel_embedding": RNG.normal(size=(2, 32)).astype(np.float32),
  }


def _nest(flat):
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def _write_t5x_legacy(directory, flat, inline=("encoder/encoder_norm/scale",), gcs_names=()):
  """A T5X legacy checkpoint: zarr arrays at relative paths plus the msgpack index."""
  os.makedirs(directory)
  target = {}
  for path, value in flat.items():
    if path in inline:
      target[path] = value
      continue
    relative = "target." + path.replace("/", ".")
    metadata = {"shape": list(value.shape), "chunks": list(value.shape),
                "compressor": {"id": "gzip"}, "dtype": "<f4"}
    store = ts.open({"driver": "zarr", "metadata": metadata,
                     "kvstore": {"driver": "file", "path": os.path.join(directory, relative)}},
                    create=True).result()
    store.write(value).result()
    # As T5X writes them: relative paths; GCS-written ones name a placeholder bucket.
    kvstore = ({"driver": "gcs", "bucket": "t5x-dummy-bucket", "path": relative}
               if path in gcs_names else {"driver": "file", "path": relative})
    target[path] = {"driver": "zarr", "dtype": "float32", "kvstore": kvstore,
                    "metadata": metadata}
  missing_state = {"driver": "zarr", "kvstore": {"driver": "file", "path": "state.never.read"},
                   "metadata": {"shape": [3]}}
  contents = {"version": 3, "optimizer": {
      "target": _nest(target),
      "state": {"step": np.int32(7), "param_states": {"encoder": {"v": missing_state}}}}}
  with open(os.path.join(directory, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(contents))


def test_t5x_legacy_reads_zarr_arrays_at_relative_paths_and_inline_arrays(tmp_path):
  params = _params()
  # Written in one place, read after a move: the index's paths must be relative.
  _write_t5x_legacy(str(tmp_path / "written" / "checkpoint_7"), params,
                    gcs_names=("encoder/layers_0/mlp/wi_0/kernel",))
  os.rename(tmp_path / "written", tmp_path / "moved")
  directory = str(tmp_path / "moved" / "checkpoint_7")
  assert detect_format(directory) == "t5x"
  loaded = read_t5x_legacy(directory)
  assert sorted(loaded) == sorted(params)  # optimizer state not read
  for path, value in params.items():
    np.testing.assert_array_equal(loaded[path], value, err_msg=path)
  np.testing.assert_array_equal(read_checkpoint(os.path.join(directory, "checkpoint"))[
      "token_embedder/embedding"], params["token_embedder/embedding"])


def test_t5x_scanned_layers_are_split_along_the_param_scan_axis(tmp_path):
  per_layer = {f"encoder/layers_{i}/{name}": RNG.normal(size=shape).astype(np.float32)
               for i in range(3) for name, shape in (("mlp/wi_0/kernel", (8, 12)),
                                                     ("pre_mlp_layer_norm/scale", (8,)))}
  scanned = {  # T5X's scalable_t5 layout: module `layers`, layers on axis 1
      f"encoder/layers/{name}": np.stack([per_layer[f"encoder/layers_{i}/{name}"]
                                          for i in range(3)], axis=1)
      for name in ("mlp/wi_0/kernel", "pre_mlp_layer_norm/scale")}
  scanned["encoder/encoder_norm/scale"] = RNG.normal(size=(8,)).astype(np.float32)
  directory = str(tmp_path / "checkpoint_3")
  _write_t5x_legacy(directory, scanned)
  loaded = read_t5x_legacy(directory)
  assert sorted(loaded) == sorted(list(per_layer) + ["encoder/encoder_norm/scale"])
  for name, value in per_layer.items():
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_orbax_checkpoint_reads_target_subtree_only(tmp_path):
  import orbax.checkpoint as ocp
  params = _params()
  tree = {"target": _nest(params), "state": {"step": 3, "param_states": {
      "m": np.zeros((5,), np.float32)}}}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(tmp_path / "ckpt"), tree)
  checkpointer.wait_until_finished()
  assert detect_format(str(tmp_path / "ckpt")) == "orbax"
  loaded = read_orbax(str(tmp_path / "ckpt"))
  assert sorted(loaded) == sorted(params)
  for path, value in params.items():
    assert isinstance(loaded[path], np.ndarray)
    np.testing.assert_array_equal(loaded[path], value, err_msg=path)


def test_orbax_root_level_params_and_manager_item_directory(tmp_path):
  import orbax.checkpoint as ocp
  params = _params()
  checkpointer = ocp.PyTreeCheckpointer()
  checkpointer.save(str(tmp_path / "step_5" / "state"), _nest(params))
  # A CheckpointManager step directory: the one item under it is found.
  assert detect_format(str(tmp_path / "step_5")) == "orbax"
  loaded = read_checkpoint(str(tmp_path / "step_5"))
  assert sorted(loaded) == sorted(params)


def _vit_params(num_layers, width=8, heads=2, grid=3, prefix=""):
  flat = {f"{prefix}embedding/kernel": RNG.normal(size=(4, 4, 3, width)),
          f"{prefix}embedding/bias": RNG.normal(size=(width,)),
          f"{prefix}pos_embedding": RNG.normal(size=(1, grid * grid, width)),
          f"{prefix}Transformer/encoder_norm/scale": RNG.normal(size=(width,)),
          f"{prefix}Transformer/encoder_norm/bias": RNG.normal(size=(width,)),
          f"{prefix}MAPHead_0/probe": RNG.normal(size=(1, 1, width))}
  for i in range(num_layers):
    block = f"{prefix}Transformer/encoderblock_{i}"
    flat[f"{block}/LayerNorm_0/scale"] = RNG.normal(size=(width,))
    flat[f"{block}/MultiHeadDotProductAttention_0/query/kernel"] = RNG.normal(
        size=(width, heads, width // heads))
    flat[f"{block}/MlpBlock_0/Dense_0/kernel"] = RNG.normal(size=(width, 2 * width))
  return {k: v.astype(np.float32) for k, v in flat.items()}


def test_big_vision_npz_unscanned_with_params_img_prefix(tmp_path):
  flat = _vit_params(2, prefix="params/img/")
  flat["params/txt/Embed_0/embedding"] = np.ones((4, 8), np.float32)
  path = str(tmp_path / "siglip.npz")
  np.savez(path, **flat)
  assert detect_format(path) == "big_vision"
  loaded = read_big_vision_npz(path)
  expected = {k[len("params/img/"):]: v for k, v in flat.items()
              if k.startswith("params/img/") and "MAPHead" not in k}
  assert sorted(loaded) == sorted(expected)
  for path_, value in expected.items():
    np.testing.assert_array_equal(loaded[path_], value)


def test_big_vision_npz_scanned_blocks_are_split_per_layer(tmp_path):
  unscanned = _vit_params(3)
  scanned = {k: v for k, v in unscanned.items() if "encoderblock_" not in k}
  for name in ("LayerNorm_0/scale", "MultiHeadDotProductAttention_0/query/kernel",
               "MlpBlock_0/Dense_0/kernel"):
    scanned[f"Transformer/encoderblock/{name}"] = np.stack(
        [unscanned[f"Transformer/encoderblock_{i}/{name}"] for i in range(3)])
  path = str(tmp_path / "scanned.npz")
  np.savez(path, **scanned)
  loaded = read_big_vision_npz(path)
  expected = {k: v for k, v in unscanned.items() if "MAPHead" not in k}
  assert sorted(loaded) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(loaded[name], value)


def test_sharded_safetensors_with_index_and_bfloat16(tmp_path):
  from safetensors.numpy import save_file
  a = RNG.normal(size=(3, 4)).astype(np.float32)
  b = RNG.normal(size=(5,)).astype(np.float32)
  save_file({"a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
  save_file({"b": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
  index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                          "b": "model-00002-of-00002.safetensors"}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  assert detect_format(str(tmp_path / "model.safetensors.index.json")) == "hf"
  loaded = read_safetensors(str(tmp_path))
  np.testing.assert_array_equal(loaded["a"], a)
  np.testing.assert_array_equal(loaded["b"], b)

  # numpy has no bfloat16: such tensors (most published checkpoints) are read raw.
  import torch
  from safetensors.torch import save_file as save_torch
  c = torch.randn(2, 3).to(torch.bfloat16)
  save_torch({"c": c, "d": torch.ones(2)}, str(tmp_path / "bf16.safetensors"))
  loaded = read_safetensors(str(tmp_path / "bf16.safetensors"))
  assert loaded["c"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(loaded["c"].astype(np.float32), c.float().numpy())
  np.testing.assert_array_equal(loaded["d"], np.ones(2, np.float32))


def test_nonexistent_checkpoint_path_is_named(tmp_path):
  missing = str(tmp_path / "no_such_checkpoint")
  with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
    read_checkpoint(missing)
  with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
    detect_format(missing)


def test_unrecognised_directory_is_an_error(tmp_path):
  (tmp_path / "notes.txt").write_text("hi")
  with pytest.raises(ValueError, match="cannot tell the checkpoint format"):
    detect_format(str(tmp_path))
