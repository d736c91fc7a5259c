"""MoME's vision towers from transformers safetensors: DINOv2, CLIP, Pix2Struct's encoder.

* `Dinov2Model` and `Dinov2WithRegistersModel` -> `models.dinov2.DinoV2`;
* `CLIPVisionModel` (or the `vision_model` of a `CLIPModel`) -> `models.clip_vision.ClipVision`;
* `Pix2StructVisionModel` (or the `encoder` of a `Pix2StructForConditionalGeneration`)
  -> `models.pix2struct_vision.Pix2StructVision`.

Each `*_config_from_hf` reads `config.json` into our config, refusing variants the tower does
not implement (DINOv2's SwiGLU MLP, an activation it lacks) by name. `load_vision_tower(path,
config)` imports a checkpoint for a given tower config and checks the two agree: a width,
patch size, depth or any other shape that differs is an error naming the config field (or
the parameter) and both values. Layout conversions (torch `[out, in]` -> ours, attention's
`[heads, head_dim]` split) are `hf_safetensors`'.
"""
import math
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from omni_smola import param_layout
from omni_smola.checkpoints.hf_safetensors import (_Consumer, _layer_indices,
                                                   _linear_to_heads_in, _linear_to_heads_out,
                                                   read_hf_config, read_safetensors)
from omni_smola.checkpoints.tree import Flat, flatten
from omni_smola.models import bicubic
from omni_smola.models.clip_vision import ClipVision
from omni_smola.models.configs import ClipVisionConfig, DinoV2Config, Pix2StructVisionConfig
from omni_smola.models.dinov2 import DinoV2
from omni_smola.models.pix2struct_vision import Pix2StructVision

# transformers' activation names -> `models.vit_blocks.ACTIVATIONS`.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                  "quick_gelu": "quick_gelu"}
# (HF, ours) module names.
DINOV2_ATTENTION = (("attention.attention.query", "query"), ("attention.attention.key", "key"),
                    ("attention.attention.value", "value"))
DINOV2_OUTPUT = ("attention.output.dense", "out")
DINOV2_NORMS = (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1"))
DINOV2_SCALES = (("layer_scale1", "LayerScale_0"), ("layer_scale2", "LayerScale_1"))
CLIP_ATTENTION = (("self_attn.q_proj", "query"), ("self_attn.k_proj", "key"),
                  ("self_attn.v_proj", "value"))
CLIP_OUTPUT = ("self_attn.out_proj", "out")
CLIP_NORMS = (("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1"))
VIT_MLP = (("mlp.fc1", "Dense_0"), ("mlp.fc2", "Dense_1"))
PIX2STRUCT_ATTENTION = (("query", "query"), ("key", "key"), ("value", "value"))
PIX2STRUCT_NORMS = (("pre_attention_layer_norm", "pre_attention_layer_norm"),
                    ("pre_mlp_layer_norm", "pre_mlp_layer_norm"))
PIX2STRUCT_MLP = ("wi_0", "wi_1", "wo")


def _dict(path_or_config: Any, nested: str) -> Dict[str, Any]:
  config = (dict(path_or_config) if isinstance(path_or_config, Mapping)
            else read_hf_config(path_or_config))
  if not config:
    raise ValueError(f"no config.json beside {path_or_config}")
  return dict(config.get(nested) or config)


def _activation(what: str, key: str, value: str) -> str:
  if value not in HF_ACTIVATIONS:
    raise ValueError(f"{what} checkpoint has {key}={value!r}; the tower implements "
                     f"{sorted(HF_ACTIVATIONS)}")
  return HF_ACTIVATIONS[value]


def _refuse(what: str, config: Mapping[str, Any], unsupported: Mapping[str, Any]) -> None:
  """Raises for a config.json value the tower does not implement (key: the value it needs)."""
  for key, needed in unsupported.items():
    if config.get(key, needed) != needed:
      raise ValueError(f"{what} checkpoint has {key}={config[key]!r}; the tower implements "
                       f"{key}={needed!r} only")


# ----------------------------------------------------------------------------- configs


def dinov2_config_from_hf(path_or_config: Any, **overrides) -> DinoV2Config:
  """Our `DinoV2Config` for a `Dinov2Model` / `Dinov2WithRegistersModel` checkpoint."""
  hf = _dict(path_or_config, "vision_config")
  _refuse("DINOv2", hf, {"use_swiglu_ffn": False, "qkv_bias": True, "num_channels": 3})
  fields = dict(width=hf["hidden_size"], depth=hf["num_hidden_layers"],
                mlp_dim=int(hf["hidden_size"] * hf.get("mlp_ratio", 4)),
                num_heads=hf["num_attention_heads"], patch_size=hf["patch_size"],
                image_size=hf["image_size"],
                num_register_tokens=hf.get("num_register_tokens") or 0,
                # transformers resizes the registers variant's positions with antialiasing.
                antialias=hf.get("model_type") == "dinov2_with_registers",
                activation=_activation("DINOv2", "hidden_act", hf.get("hidden_act", "gelu")),
                layer_norm_eps=hf.get("layer_norm_eps", 1e-6))
  return DinoV2Config(**{**fields, **overrides})


def clip_vision_config_from_hf(path_or_config: Any, **overrides) -> ClipVisionConfig:
  """Our `ClipVisionConfig` for a `CLIPVisionModel` / `CLIPModel` checkpoint.

  `depth=` below the checkpoint's drops its last layers (MoME drops EVA-CLIP's last one).
  """
  hf = _dict(path_or_config, "vision_config")
  _refuse("CLIP vision", hf, {"num_channels": 3})
  fields = dict(width=hf["hidden_size"], depth=hf["num_hidden_layers"],
                mlp_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
                patch_size=hf["patch_size"], image_size=hf["image_size"],
                activation=_activation("CLIP vision", "hidden_act",
                                       hf.get("hidden_act", "quick_gelu")),
                layer_norm_eps=hf.get("layer_norm_eps", 1e-5))
  return ClipVisionConfig(**{**fields, **overrides})


def pix2struct_vision_config_from_hf(path_or_config: Any, **overrides) -> Pix2StructVisionConfig:
  """Our `Pix2StructVisionConfig` for a `Pix2StructVisionModel` checkpoint.

  The patch size is not in transformers' config (its image processor has it); it is read
  from `patch_embed_hidden_size` = patch_size**2 * 3.
  """
  hf = _dict(path_or_config, "vision_config")
  patch_dim = hf.get("patch_embed_hidden_size", 768)
  patch_size = math.isqrt(patch_dim // 3)
  if patch_size * patch_size * 3 != patch_dim:
    raise ValueError(f"Pix2Struct checkpoint has patch_embed_hidden_size={patch_dim}, not "
                     "patch_size**2 * 3 for any square RGB patch")
  dense_act = _activation("Pix2Struct vision", "dense_act_fn", hf.get("dense_act_fn", "gelu_new"))
  if dense_act != "gelu_tanh":  # the T5 gated MLP the tower reuses
    raise ValueError(f"Pix2Struct checkpoint has dense_act_fn={hf['dense_act_fn']!r}; the "
                     "tower implements 'gelu_new' only")
  fields = dict(width=hf["hidden_size"], depth=hf["num_hidden_layers"], mlp_dim=hf["d_ff"],
                num_heads=hf["num_attention_heads"], head_dim=hf["d_kv"], patch_size=patch_size,
                num_positions=hf.get("seq_len", 4096),
                layer_norm_eps=hf.get("layer_norm_eps", 1e-6))
  fields.update(overrides)
  fields.setdefault("max_patches", min(2048, fields["num_positions"] - 1))
  return Pix2StructVisionConfig(**fields)


# ----------------------------------------------------------------------------- tensors


def _rooted(tensors: Mapping[str, np.ndarray], marker: str, what: str) -> _Consumer:
  """The tensors under the prefix that precedes `marker` (a full model's `vision_model.`)."""
  found = [n for n in tensors if n.endswith(marker)]
  if not found:
    raise ValueError(f"not a {what} checkpoint: no tensor named '*{marker}'")
  root = found[0][: -len(marker)]
  return _Consumer({n[len(root):]: v for n, v in tensors.items() if n.startswith(root)}, what)


def _biased_attention(get: _Consumer, out: Flat, src: str, dst: str, num_heads: int,
                      inputs, output) -> None:
  for hf, ours in inputs:
    out[f"{dst}/{ours}/kernel"] = _linear_to_heads_in(get(f"{src}.{hf}.weight"), num_heads)
    out[f"{dst}/{ours}/bias"] = get(f"{src}.{hf}.bias").reshape(num_heads, -1)
  hf, ours = output
  out[f"{dst}/{ours}/kernel"] = _linear_to_heads_out(get(f"{src}.{hf}.weight"), num_heads)
  out[f"{dst}/{ours}/bias"] = get(f"{src}.{hf}.bias")


def _biased(get: _Consumer, out: Flat, src: str, dst: str, pairs, transpose: bool) -> None:
  """Linear layers (`transpose`: kernel = weight.T) or LayerNorms (scale = weight), with bias."""
  for hf, ours in pairs:
    hf_name = f"{src}.{hf}" if src else hf
    our_name = f"{dst}/{ours}" if dst else ours
    weight = get(f"{hf_name}.weight")
    out[f"{our_name}/{'kernel' if transpose else 'scale'}"] = weight.T if transpose else weight
    out[f"{our_name}/bias"] = get(f"{hf_name}.bias")


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
  return weight.transpose(2, 3, 1, 0)  # torch [out, in, kh, kw] -> [kh, kw, in, out]


def dinov2_from_hf(tensors: Mapping[str, np.ndarray], num_heads: int) -> Flat:
  """DINOv2 tensors -> `models.dinov2` `{path: array}` (the mask token, used only in
  DINOv2's masked pre-training, is skipped)."""
  get = _rooted(tensors, "embeddings.patch_embeddings.projection.weight", "DINOv2")
  out: Flat = {
      "embedding/kernel": _conv_kernel(get("embeddings.patch_embeddings.projection.weight")),
      "embedding/bias": get("embeddings.patch_embeddings.projection.bias"),
      "cls": get("embeddings.cls_token"),
      "pos_embedding": get("embeddings.position_embeddings"),
  }
  if "embeddings.register_tokens" in get:
    out["registers"] = get("embeddings.register_tokens")
  for i in _layer_indices(get.tensors, r"encoder\.layer\.(\d+)\."):
    src, dst = f"encoder.layer.{i}", f"Transformer/encoderblock_{i}"
    _biased(get, out, src, dst, DINOV2_NORMS, transpose=False)
    _biased_attention(get, out, src, f"{dst}/MultiHeadDotProductAttention_0", num_heads,
                      DINOV2_ATTENTION, DINOV2_OUTPUT)
    for hf, ours in DINOV2_SCALES:
      out[f"{dst}/{ours}/scale"] = get(f"{src}.{hf}.lambda1")
    _biased(get, out, src, f"{dst}/MlpBlock_0", VIT_MLP, transpose=True)
  _biased(get, out, "", "Transformer", (("layernorm", "encoder_norm"),), transpose=False)
  get.check_all_used(ignored=(r"embeddings\.mask_token",))
  return out


def clip_vision_from_hf(tensors: Mapping[str, np.ndarray], num_heads: int,
                        depth: Optional[int] = None) -> Flat:
  """CLIP vision tensors -> `models.clip_vision` `{path: array}`.

  `depth`: keep the first `depth` layers (None: all). The patch convolution has no bias in
  CLIP; ours gets a zero one. `post_layernorm` (the pooled class token's) and anything
  outside the vision model (a CLIPModel's text tower, projections) are skipped.
  """
  get = _rooted(tensors, "embeddings.patch_embedding.weight", "CLIP vision")
  kernel = _conv_kernel(get("embeddings.patch_embedding.weight"))
  out: Flat = {
      "embedding/kernel": kernel,
      "embedding/bias": np.zeros(kernel.shape[-1], kernel.dtype),
      "cls": get("embeddings.class_embedding")[None, None],
      "pos_embedding": get("embeddings.position_embedding.weight")[None],
  }
  layers = _layer_indices(get.tensors, r"encoder\.layers\.(\d+)\.")
  if depth is not None and depth > len(layers):
    raise ValueError(f"ClipVisionConfig.depth={depth} but the checkpoint has {len(layers)} layers")
  for i in layers[:depth]:
    src, dst = f"encoder.layers.{i}", f"Transformer/encoderblock_{i}"
    _biased(get, out, src, dst, CLIP_NORMS, transpose=False)
    _biased_attention(get, out, src, f"{dst}/MultiHeadDotProductAttention_0", num_heads,
                      CLIP_ATTENTION, CLIP_OUTPUT)
    _biased(get, out, src, f"{dst}/MlpBlock_0", VIT_MLP, transpose=True)
  _biased(get, out, "", "", (("pre_layrnorm", "pre_norm"),), transpose=False)
  dropped = "|".join(str(i) for i in layers[depth:]) if depth is not None else ""
  get.check_all_used(ignored=(r"post_layernorm\..*",)
                     + ((rf"encoder\.layers\.({dropped})\..*",) if dropped else ()))
  return out


def pix2struct_vision_from_hf(tensors: Mapping[str, np.ndarray], num_heads: int) -> Flat:
  """Pix2Struct vision tensors -> `models.pix2struct_vision` `{path: array}`."""
  get = _rooted(tensors, "embeddings.patch_projection.weight", "Pix2Struct vision")
  out: Flat = {
      "patch_projection/kernel": get("embeddings.patch_projection.weight").T,
      "patch_projection/bias": get("embeddings.patch_projection.bias"),
      "row_embedding": get("embeddings.row_embedder.weight"),
      "col_embedding": get("embeddings.column_embedder.weight"),
  }
  for i in _layer_indices(get.tensors, r"encoder\.layer\.(\d+)\."):
    src, dst = f"encoder.layer.{i}", f"layers_{i}"
    for hf, ours in PIX2STRUCT_NORMS:
      out[f"{dst}/{ours}/scale"] = get(f"{src}.{hf}.weight")
    for hf, ours in PIX2STRUCT_ATTENTION:
      out[f"{dst}/attention/{ours}/kernel"] = _linear_to_heads_in(
          get(f"{src}.attention.{hf}.weight"), num_heads)
    out[f"{dst}/attention/out/kernel"] = _linear_to_heads_out(
        get(f"{src}.attention.output.weight"), num_heads)
    for name in PIX2STRUCT_MLP:
      out[f"{dst}/mlp/{name}/kernel"] = get(f"{src}.mlp.{name}.weight").T
  out["encoder_norm/scale"] = get("layernorm.weight")
  get.check_all_used()
  return out


# ----------------------------------------------------------------------------- loading


def _tower_table():
  """Config type -> (tower class, importer(tensors, config), dummy inputs for its shapes)."""
  def image(cfg):
    return (jnp.zeros((1, cfg.image_size, cfg.image_size, 3)),)

  def patches(cfg):
    return (jnp.zeros((1, 1, cfg.patch_dim)), jnp.ones((1, 1), jnp.int32),
            jnp.ones((1, 1), jnp.int32))

  return {
      DinoV2Config: (DinoV2, lambda t, c: dinov2_from_hf(t, c.num_heads), image),
      ClipVisionConfig: (ClipVision, lambda t, c: clip_vision_from_hf(t, c.num_heads, c.depth),
                         image),
      Pix2StructVisionConfig: (Pix2StructVision,
                               lambda t, c: pix2struct_vision_from_hf(t, c.num_heads), patches),
  }


def _checkpoint_geometry(flat: Flat) -> Dict[str, int]:
  """The imported checkpoint's width, patch size and depth (config field -> value)."""
  if "patch_projection/kernel" in flat:
    patch_dim, width = flat["patch_projection/kernel"].shape
    patch_size = math.isqrt(patch_dim // 3)
  else:
    patch_size, _, _, width = flat["embedding/kernel"].shape
  depth = len(_layer_indices(flat, r"(?:Transformer/encoderblock|layers)_(\d+)/"))
  return {"width": width, "patch_size": patch_size, "depth": depth}


def _resample_positions(flat: Flat, config) -> None:
  """A ViT checkpoint trained at another image size: resize its patch positions to config's."""
  posemb = flat.get("pos_embedding")
  if posemb is None or posemb.shape[1] == 1 + config.grid_size ** 2:
    return
  patches = bicubic.resize_square_grid(posemb[0, 1:], (config.grid_size,) * 2,
                                       getattr(config, "antialias", False))
  flat["pos_embedding"] = np.concatenate([posemb[:, :1], np.asarray(patches)[None]], axis=1)


def load_vision_tower(path: str, config) -> Flat:
  """A transformers checkpoint (file, index json or folder) as `config`'s tower's parameters.

  `config`: a `DinoV2Config`, `ClipVisionConfig` or `Pix2StructVisionConfig` (e.g. from
  `*_config_from_hf(path)`, possibly changed). Returns `{path: array}` in the tower's layout
  (`checkpoints.tree.unflatten` makes the `params` tree), per layer or stacked as
  `config.scan_layers` wants. A ViT checkpoint trained at another `image_size` gets its
  patch positions resized; a fewer-layer CLIP drops the checkpoint's last layers; any other
  disagreement raises, naming the config field (or the parameter) and both values.
  """
  table = _tower_table()
  if type(config) not in table:
    raise TypeError(f"load_vision_tower takes one of {[t.__name__ for t in table]}, "
                    f"got {type(config).__name__}")
  tower, importer, inputs = table[type(config)]
  flat = importer(read_safetensors(path), config)
  geometry = _checkpoint_geometry(flat)
  for field, value in geometry.items():
    if getattr(config, field) != value:
      raise ValueError(f"{type(config).__name__}.{field}={getattr(config, field)} does not "
                       f"match the checkpoint {path}: its {field} is {value}")
  _resample_positions(flat, config)
  expected = flatten(jax.eval_shape(tower(config).init, jax.random.PRNGKey(0),
                                    *inputs(config))["params"])
  expected = {k: getattr(v, "value", v).shape for k, v in expected.items()}
  flat = param_layout.match_layer_layout(flat, expected)  # a scanned tower stacks its layers
  mismatched = sorted(f"{k}: tower {expected.get(k)} vs checkpoint "
                      f"{flat[k].shape if k in flat else None}"
                      for k in set(expected) | set(flat)
                      if k not in flat or k not in expected or expected[k] != flat[k].shape)
  if mismatched:
    raise ValueError(f"{type(config).__name__} does not match the checkpoint {path}: "
                     + "; ".join(mismatched[:10]))
  return flat
