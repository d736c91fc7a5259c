"""Merging a pretrained backbone checkpoint into a model's parameters.

`load_pretrained` reads a checkpoint in any supported format (converted to our
parameter names by the format's importer) and puts it into the model's tree:

* every model parameter found in the checkpoint takes the checkpoint's value
  (cast to the model's dtype, placed with the model's sharding when it has one);
* adapter parameters (a path with an `adapter` component) are never in a backbone
  checkpoint: they keep their fresh initialisation;
* any other parameter missing from the checkpoint, any shape mismatch, and any
  checkpoint array the model has no place for are errors (all reported at once,
  each naming the parameter and both shapes), unless `allow_missing` /
  `ignore_unexpected` say otherwise;
* ViT position embeddings of another grid size are resampled (bilinear).

A PaLI model nests its towers (text encoder-decoder, vision tower) under sub-keys;
`prefix` puts a checkpoint under one of them and limits the checks to it, so a T5
checkpoint fills the text side and a SigLIP checkpoint the image side;
`load_pali_pretrained` does both in one pass.
"""
import logging
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from omni_smola import param_layout
from omni_smola.checkpoints import hf_safetensors, orbax_format
from omni_smola.checkpoints.big_vision_npz import read_big_vision_npz
from omni_smola.checkpoints.t5x_legacy import read_t5x_legacy
from omni_smola.checkpoints.tree import Flat, flatten, unflatten
from omni_smola.models.vit import resample_position_embedding

FORMATS = ("hf", "t5x", "orbax", "big_vision")
PathLike = Union[str, os.PathLike]


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model; the message lists every problem."""


def _existing(path: PathLike) -> epath.Path:
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint path does not exist: {path}")
  return path


def detect_format(path: PathLike) -> str:
  """'hf', 't5x', 'orbax' or 'big_vision', from the files at `path` (local or gs://)."""
  path = _existing(path)
  name = path.name
  if not path.is_dir():
    if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
      return "hf"
    if name.endswith(".npz"):
      return "big_vision"
    if name == "checkpoint":
      return "t5x"
    raise ValueError(f"cannot tell the checkpoint format of file {path}: expected "
                     "*.safetensors, *.safetensors.index.json, *.npz or a T5X 'checkpoint'")
  children = {child.name: child for child in path.iterdir()}
  if "_METADATA" in children:
    return "orbax"
  if "checkpoint" in children and not children["checkpoint"].is_dir():
    return "t5x"
  if orbax_format.is_orbax_dir(path) or any(
      (child / "_METADATA").exists() for child in children.values() if child.is_dir()):
    return "orbax"
  if any(n.endswith(".safetensors") or n == hf_safetensors.INDEX_NAME for n in children):
    return "hf"
  raise ValueError(f"cannot tell the checkpoint format of directory {path}: no *.safetensors, "
                   "T5X 'checkpoint' file or Orbax _METADATA")


def read_checkpoint(path: PathLike, format: str = "auto", **options) -> Flat:
  """A checkpoint's parameters in our layout, `{path: np.ndarray}`.

  `options` go to the format's reader: `model`/`num_heads` (hf), `subtree`
  (t5x, orbax), `prefix` (big_vision).
  """
  path = str(_existing(path))
  if format == "auto":
    format = detect_format(path)
  readers = {"hf": hf_safetensors.load_hf, "t5x": read_t5x_legacy,
             "orbax": orbax_format.read_orbax, "big_vision": read_big_vision_npz}
  if format not in readers:
    raise ValueError(f"unknown checkpoint format {format!r}; expected one of {FORMATS}")
  return readers[format](path, **options)


def _value(leaf):
  # `.value`, not `.unbox()`: unboxing may add a sharding constraint, which needs a mesh.
  return leaf.value if param_layout.is_box(leaf) else leaf


def _is_abstract(x) -> bool:
  return isinstance(x, jax.ShapeDtypeStruct)


def _place(array: np.ndarray, like) -> jax.Array:
  """`array` with the dtype of `like`, and its sharding when it has one.

  Each process builds only its addressable shards from the host copy, so this
  also works for shardings that span several hosts.
  """
  array = np.asarray(array).astype(like.dtype, copy=False)
  sharding = getattr(like, "sharding", None)
  if sharding is not None:
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
  return jnp.asarray(array)


def _fit(name: str, array: np.ndarray, target_shape: tuple, resample: bool):
  """`array` in the model's shape where that is a known, safe conversion, else None."""
  shape = tuple(np.shape(array))
  if shape == target_shape:
    return array
  if (resample and name.split("/")[-1] == "pos_embedding" and len(shape) == 3
      and len(target_shape) == 3 and shape[::2] == target_shape[::2]):
    try:
      return resample_position_embedding(np.asarray(array), target_shape[1])
    except ValueError:
      return None
  return None


def _in_scope(name: str, scope: Sequence[str]) -> bool:
  return any(not s or name == s or name.startswith(s + "/") for s in scope)


def _load(checkpoint, format: str, options: Mapping[str, Any]):
  if isinstance(checkpoint, Mapping):
    return flatten(checkpoint), "the given arrays"
  return read_checkpoint(checkpoint, format, **options), str(checkpoint)


def _with_prefix(flat: Flat, prefix: str) -> Flat:
  return {f"{prefix}/{k}" if prefix else k: v for k, v in flat.items()}


def _listing(kind: str, lines: Sequence[str], limit: int = 20) -> list:
  shown = [f"{kind}: {line}" for line in lines[:limit]]
  if len(lines) > limit:
    shown.append(f"{kind}: ... and {len(lines) - limit} more")
  return shown


def merge_into(target: Mapping[str, Any], loaded: Flat, scope: Sequence[str] = ("",), *,
               source: str = "the checkpoint", allow_missing: Sequence[str] = (),
               ignore_unexpected: bool = False, resample_position_embeddings: bool = True,
               init_fn: Optional[Callable[[], Mapping[str, Any]]] = None,
               frozen: Optional[Callable[[str], bool]] = None) -> Any:
  """`target` with the arrays of `loaded` (full model paths) in place; see `load_pretrained`.

  `scope`: '/'-prefixes of the parameters `loaded` is responsible for ('' = all).
  """
  is_variables = isinstance(target.get("params"), Mapping)
  model = flatten(target["params"] if is_variables else target, is_leaf=param_layout.is_box)
  try:  # per-layer checkpoints load into scanned stacks and back (models.layer_stack)
    loaded = param_layout.match_layer_layout(
        loaded, {name: tuple(_value(leaf).shape) for name, leaf in model.items()})
  except param_layout.LayerLayoutError as e:
    raise CheckpointMismatchError(f"{source} does not fit the model: {e}") from None
  merged = dict(model)
  missing, mismatched, kept, frozen_missing = [], [], [], []
  for name in sorted(model):
    leaf = model[name]
    like = _value(leaf)
    if name not in loaded:
      optional = param_layout.is_adapter_path(name) or any(re.search(p, name) for p in allow_missing)
      if _in_scope(name, scope) and not optional:
        missing.append(f"{name} (model shape {tuple(like.shape)}) is not in the checkpoint")
      elif _in_scope(name, scope) and frozen is not None and frozen(name):
        frozen_missing.append(name)
      elif _is_abstract(like):
        kept.append(name)
      continue
    array = _fit(name, loaded[name], tuple(like.shape), resample_position_embeddings)
    if array is None:
      mismatched.append(f"{name}: checkpoint {tuple(np.shape(loaded[name]))} "
                        f"vs model {tuple(like.shape)}")
      continue
    value = _place(array, like)
    merged[name] = leaf.replace_boxed(value) if param_layout.is_box(leaf) else value

  if frozen_missing:
    # A fresh parameter that never trains is a silent no-op: an adapter whose B stays 0.
    raise CheckpointMismatchError(
        f"{source} lacks {len(frozen_missing)} parameters that this run keeps frozen, first "
        f"{frozen_missing[0]}: they would stay at their initialisation (an adapter at its "
        "initialisation adds exactly nothing). A specialist run (runs/specialist.gin) needs "
        "INITIAL_CHECKPOINT_PATH to be a generalist trained with this adapter config, not a "
        "backbone-only checkpoint.")
  unexpected = [f"{k} {tuple(np.shape(loaded[k]))} has no place in the model"
                for k in sorted(set(loaded) - set(model))]
  if unexpected and ignore_unexpected:
    logging.warning("ignoring %d checkpoint arrays the model lacks: %s", len(unexpected),
                    "; ".join(unexpected[:20]))
    unexpected = []
  problems = (_listing("missing", missing) + _listing("shape mismatch", mismatched)
              + _listing("unexpected", unexpected))
  if problems and loaded and not set(loaded) & set(model):
    problems.insert(0, "no checkpoint array matches a model parameter: a checkpoint of "
                    "another model, or the wrong prefix?")
  if problems:
    raise CheckpointMismatchError(
        f"{source} does not fit the model:\n  " + "\n  ".join(problems))

  if kept:
    # An abstract model needs values for what no checkpoint gives: adapters, new layers.
    if init_fn is None:
      raise ValueError(f"the model is abstract and no checkpoint gives {kept[:5]}"
                       f"{' ...' if len(kept) > 5 else ''}: pass init_fn to initialise them")
    initial = init_fn()
    initial = flatten(initial["params"] if "params" in initial else initial,
                      is_leaf=param_layout.is_box)
    for name in kept:
      if name not in initial:
        raise ValueError(f"init_fn gave no value for {name}")
      merged[name] = initial[name]
  params = unflatten(merged)
  return {**target, "params": params} if is_variables else params


def load_pretrained(target: Mapping[str, Any],
                    checkpoint: Union[PathLike, Mapping[str, Any]],
                    format: str = "auto",
                    *,
                    prefix: str = "",
                    allow_missing: Sequence[str] = (),
                    ignore_unexpected: bool = False,
                    resample_position_embeddings: bool = True,
                    init_fn: Optional[Callable[[], Mapping[str, Any]]] = None,
                    frozen: Optional[Callable[[str], bool]] = None,
                    **read_options) -> Any:
  """`target` with its backbone parameters taken from `checkpoint`.

  Args:
    target: the model's variables (`{'params': ...}`) or params, as arrays,
      `jax.ShapeDtypeStruct`s (from `jax.eval_shape`, optionally with
      shardings) or flax partitioning boxes; the result has the same structure.
    checkpoint: a path (format per `format`, auto-detected by default) or an
      already-read `{path: array}` / nested dict in our layout.
    prefix: the '/'-path of the subtree the checkpoint fills (PaLI: 'text' for a
      T5 checkpoint, 'img' for a ViT); parameters outside it keep their values
      and are not checked.
    allow_missing: regexes (searched in the full parameter path) of non-adapter
      parameters that may be absent from the checkpoint and keep their value.
    ignore_unexpected: log, instead of raising, checkpoint arrays the model lacks.
    resample_position_embeddings: resize `pos_embedding` of another square grid.
    init_fn: when `target` is abstract, called once for the values no checkpoint
      gives (adapters, parameters outside `prefix`); returns params or variables
      holding at least those (e.g. `lambda: model.init(rng, ...)`).
    frozen: `frozen(path)` for the parameters the run will not train; one of them that
      the checkpoint lacks (adapter or `allow_missing` alike) is an error, since it would
      keep its initial value for good.
    **read_options: passed to `read_checkpoint`.

  Returns:
    The merged tree, shaped like `target`, leaves as jax arrays.
  """
  prefix = prefix.strip("/")
  loaded, source = _load(checkpoint, format, read_options)
  return merge_into(target, _with_prefix(loaded, prefix), (prefix,), source=source,
                    allow_missing=allow_missing, ignore_unexpected=ignore_unexpected,
                    resample_position_embeddings=resample_position_embeddings,
                    init_fn=init_fn, frozen=frozen)


def load_pali_pretrained(target: Mapping[str, Any],
                         text: Union[PathLike, Mapping[str, Any], None] = None,
                         image: Union[PathLike, Mapping[str, Any], None] = None,
                         *,
                         text_options: Optional[Mapping[str, Any]] = None,
                         image_options: Optional[Mapping[str, Any]] = None,
                         text_prefix: str = "text",
                         image_prefix: str = "img",
                         **merge_options) -> Any:
  """A PaLI model's towers from two backbone checkpoints, in one pass.

  `text` (T5X, Orbax, HF T5) fills `text/`, `image` (big_vision npz, HF SigLIP,
  ...) fills `img/`; `*_options` go to `read_checkpoint` (e.g. `format`,
  `prefix` of a big_vision file). Parameters of neither tower (the image
  projection) keep their fresh values. `merge_options` are `merge_into`'s.
  """
  loaded: Flat = {}
  scope, sources = [], []
  for prefix, checkpoint, options in ((text_prefix, text, text_options),
                                      (image_prefix, image, image_options)):
    if checkpoint is None:
      continue
    options = dict(options or {})
    flat, source = _load(checkpoint, options.pop("format", "auto"), options)
    loaded.update(_with_prefix(flat, prefix))
    scope.append(prefix)
    sources.append(f"{source} (into {prefix}/)")
  if not scope:
    raise ValueError("load_pali_pretrained needs a text or an image checkpoint")
  return merge_into(target, loaded, scope, source=" and ".join(sources), **merge_options)
