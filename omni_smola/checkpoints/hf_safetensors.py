"""Hugging Face `transformers` safetensors checkpoints, mapped onto our parameter names.

Two models are understood:
* T5 v1.1 / UL2 (`T5ForConditionalGeneration`), to the T5X layout of
  `omni_smola.models.t5` (T5 1.0's ungated `wi` maps to `mlp/wi/kernel`, which our
  gated-GELU T5 does not have);
* the SigLIP vision tower (`SiglipVisionModel`, or the `vision_model` of a full
  `SiglipModel`/PaliGemma file), to the big_vision layout of `omni_smola.models.vit`.

torch `Linear` weights are `[out, in]`; ours are `[in, out]`, with attention's
`heads * head_dim` side split into `[heads, head_dim]` (query/key/value:
`[embed, heads, head_dim]`, output: `[heads, head_dim, embed]`).

Files are read without torch: `safetensors.safe_open(framework="numpy")`, and a
raw memory map for the dtypes numpy lacks (bfloat16, float8), which is how most
published UL2 / SigLIP checkpoints are stored.
"""
import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np
from safetensors import safe_open

from omni_smola.checkpoints.tree import Flat
from omni_smola.models.configs import T5Config, ViTConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype names numpy cannot parse, read from the raw buffer instead.
_RAW_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


# ----------------------------------------------------------------------------- names

# HF module names -> ours. The importers below read them one way and
# `hf_export` / `peft_export` the other, so import and export cannot disagree.
# T5: each block's `layer.{j}` (j = position in the tuple) is a sublayer, given as
# (our pre-norm, HF module, our module).
T5_SUBLAYERS = {
    "encoder": (("pre_attention_layer_norm", "SelfAttention", "attention"),
                ("pre_mlp_layer_norm", "DenseReluDense", "mlp")),
    "decoder": (("pre_self_attention_layer_norm", "SelfAttention", "self_attention"),
                ("pre_cross_attention_layer_norm", "EncDecAttention",
                 "encoder_decoder_attention"),
                ("pre_mlp_layer_norm", "DenseReluDense", "mlp")),
}
T5_INPUT_PROJECTIONS = (("q", "query"), ("k", "key"), ("v", "value"))  # [embed, heads, kv]
T5_OUTPUT_PROJECTION = ("o", "out")  # [heads, kv, embed]
T5_MLP_PROJECTIONS = ("wi_0", "wi_1", "wo")  # the same name on both sides
SIGLIP_NORMS = (("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1"))
SIGLIP_INPUT_PROJECTIONS = (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))
SIGLIP_OUTPUT_PROJECTION = ("out_proj", "out")
SIGLIP_MLP = (("fc1", "Dense_0"), ("fc2", "Dense_1"))


# ----------------------------------------------------------------------------- reading


def _header(path: str) -> Tuple[Dict[str, Any], int]:
  """A safetensors file's JSON header and the byte offset of its data buffer.

  The format: 8-byte little-endian header length, the JSON header, then the buffer
  that `data_offsets` index into.
  """
  with open(path, "rb") as f:
    length = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(length))
  return header, 8 + length


def _read_raw(path: str, entry: Mapping[str, Any], data_start: int) -> np.ndarray:
  begin, _ = entry["data_offsets"]
  return np.memmap(path, dtype=np.dtype(_RAW_DTYPES[entry["dtype"]]), mode="r",
                   offset=data_start + begin, shape=tuple(entry["shape"]))


def _read_file(path: str) -> Dict[str, np.ndarray]:
  header, data_start = _header(path)
  arrays = {}
  with safe_open(path, framework="numpy") as f:
    for name in f.keys():
      if header[name]["dtype"] in _RAW_DTYPES:
        arrays[name] = _read_raw(path, header[name], data_start)
      else:
        arrays[name] = f.get_tensor(name)
  return arrays


def safetensors_files(path: str) -> list:
  """The shard files of a checkpoint given as a file, an index json or a directory."""
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, INDEX_NAME)):
      path = os.path.join(path, INDEX_NAME)
    elif os.path.exists(os.path.join(path, SINGLE_NAME)):
      path = os.path.join(path, SINGLE_NAME)
    else:
      found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
      if not found:
        raise FileNotFoundError(f"no *.safetensors file or {INDEX_NAME} in {path}")
      return [os.path.join(path, n) for n in found]
  if path.endswith(".json"):
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
    folder = os.path.dirname(path)
    return [os.path.join(folder, n) for n in sorted(set(weight_map.values()))]
  return [path]


def tensor_names(path: str) -> set:
  """The tensor names of a checkpoint, from the headers only."""
  names = set()
  for file in safetensors_files(path):
    names.update(n for n in _header(file)[0] if n != "__metadata__")
  return names


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """All tensors of a (possibly sharded) safetensors checkpoint, by their HF names."""
  arrays: Dict[str, np.ndarray] = {}
  for file in safetensors_files(path):
    arrays.update(_read_file(file))
  return arrays


def read_hf_config(path: str) -> Dict[str, Any]:
  """The `config.json` saved beside the weights, or {} when there is none."""
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = os.path.join(folder, "config.json")
  if not os.path.exists(config_path):
    return {}
  with open(config_path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- layouts


def _linear_to_heads_in(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """torch q/k/v `[heads * head_dim, embed]` -> `[embed, heads, head_dim]`."""
  out_features, in_features = weight.shape
  return np.asarray(weight).T.reshape(in_features, num_heads, out_features // num_heads)


def _linear_to_heads_out(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """torch output projection `[embed, heads * head_dim]` -> `[heads, head_dim, embed]`."""
  out_features, in_features = weight.shape
  return np.asarray(weight).T.reshape(num_heads, in_features // num_heads, out_features)


class _Consumer:
  """Hands out HF tensors by name and remembers which ones were used."""

  def __init__(self, tensors: Mapping[str, np.ndarray], what: str):
    self.tensors, self.what, self.used = tensors, what, set()

  def __contains__(self, name):
    return name in self.tensors

  def __call__(self, name: str) -> np.ndarray:
    if name not in self.tensors:
      raise KeyError(f"{self.what} checkpoint has no tensor '{name}'")
    self.used.add(name)
    return np.asarray(self.tensors[name])

  def check_all_used(self, ignored=()):
    left = sorted(n for n in self.tensors if n not in self.used
                  and not any(re.fullmatch(p, n) for p in ignored))
    if left:
      raise ValueError(f"{self.what} checkpoint has tensors this importer does not map "
                       f"(unsupported variant?): {left[:10]}{' ...' if len(left) > 10 else ''}")


def _layer_indices(names, pattern: str) -> list:
  return sorted({int(m.group(1)) for n in names if (m := re.match(pattern, n))})


def is_t5(tensors: Mapping[str, Any]) -> bool:
  return any(".block.0.layer.0.SelfAttention." in n for n in tensors)


def is_siglip_vision(tensors: Mapping[str, Any]) -> bool:
  return any(n.endswith("embeddings.patch_embedding.weight") for n in tensors)


def _t5_logits_scale(config: Mapping[str, Any], emb_dim: int, has_lm_head: bool) -> float:
  """The factor on the decoder output before HF's `lm_head`."""
  scaled = config.get("scale_decoder_outputs", config.get("tie_word_embeddings", not has_lm_head))
  return emb_dim ** -0.5 if scaled else 1.0


def t5_config_from_hf(path_or_config: Any) -> T5Config:
  """Our `T5Config` for a transformers T5 checkpoint (its folder, file or config dict).

  Only what our T5 implements is accepted: gated GELU (T5.1.1); UL2's gated SiLU
  (T5 1.0's ReLU, say) are refused with the activation named.
  """
  if isinstance(path_or_config, Mapping):
    config, names = dict(path_or_config), set()
  else:
    config, names = read_hf_config(path_or_config), tensor_names(path_or_config)
  if not config:
    raise ValueError(f"no config.json beside {path_or_config}")
  activation = config.get("feed_forward_proj", "relu")
  gate_activations = {"gated-gelu": "gelu", "gated-silu": "silu"}  # T5.1.1, UL2
  if activation not in gate_activations:
    raise ValueError(f"T5 checkpoint uses feed_forward_proj={activation!r}; our T5 "
                     f"implements {sorted(gate_activations)} (T5.1.1, UL2) only")
  via_embedding = ("lm_head.weight" not in names
                   and _t5_logits_scale(config, config["d_model"], False) != 1.0)
  return T5Config(
      emb_dim=config["d_model"], num_heads=config["num_heads"], head_dim=config["d_kv"],
      mlp_dim=config["d_ff"], num_encoder_layers=config["num_layers"],
      num_decoder_layers=config.get("num_decoder_layers") or config["num_layers"],
      vocab_size=config["vocab_size"],
      relative_attention_num_buckets=config.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=config.get("relative_attention_max_distance", 128),
      layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-6),
      mlp_activation=gate_activations[activation],
      logits_via_embedding=via_embedding)


def t5_from_hf(tensors: Mapping[str, np.ndarray], config: Optional[Mapping[str, Any]] = None
               ) -> Flat:
  """`T5ForConditionalGeneration` tensors -> our T5X-layout `{path: array}`.

  The output layer: HF computes logits as `(h * s) @ W.T`, with `W` the separate
  `lm_head` when the file has one, else the token embedding, and `s` either 1 or
  `d_model**-0.5` (`scale_decoder_outputs` in transformers 5, which always ties;
  `tie_word_embeddings` before it). Rescaled logits through the embedding are T5X's
  `logits_via_embedding=True` and give no `logits_dense`; every other case is a
  `logits_dense` kernel `s * W.T`. `t5_config_from_hf` sets the flag to match.
  """
  config = dict(config or {})
  get = _Consumer(tensors, "T5")
  num_heads = get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight").shape[1]
  out: Flat = {}
  shared_name = "shared.weight" if "shared.weight" in get else "encoder.embed_tokens.weight"
  embedding = get(shared_name)
  out["token_embedder/embedding"] = embedding

  def attention(src: str, dst: str):
    for hf, ours in T5_INPUT_PROJECTIONS:
      out[f"{dst}/{ours}/kernel"] = _linear_to_heads_in(get(f"{src}.{hf}.weight"), num_heads)
    hf, ours = T5_OUTPUT_PROJECTION
    out[f"{dst}/{ours}/kernel"] = _linear_to_heads_out(get(f"{src}.{hf}.weight"), num_heads)

  def mlp(src: str, dst: str):
    names = ("wi_0", "wi_1") if f"{src}.wi_0.weight" in get else ("wi",)
    for name in names + ("wo",):
      out[f"{dst}/{name}/kernel"] = get(f"{src}.{name}.weight").T

  for stack in ("encoder", "decoder"):
    for i in _layer_indices(tensors, rf"{stack}\.block\.(\d+)\."):
      src, dst = f"{stack}.block.{i}.layer", f"{stack}/layers_{i}"
      for j, (norm, hf_module, module) in enumerate(T5_SUBLAYERS[stack]):
        out[f"{dst}/{norm}/scale"] = get(f"{src}.{j}.layer_norm.weight")
        sublayer = mlp if module == "mlp" else attention
        sublayer(f"{src}.{j}.{hf_module}", f"{dst}/{module}")
    # [buckets, heads] in HF, [heads, buckets] in T5X; one table per stack, kept in block 0.
    out[f"{stack}/relpos_bias/rel_embedding"] = get(
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight").T
    norm = "encoder_norm" if stack == "encoder" else "decoder_norm"
    out[f"{stack}/{norm}/scale"] = get(f"{stack}.final_layer_norm.weight")

  has_lm_head = "lm_head.weight" in get
  scale = _t5_logits_scale(config, embedding.shape[1], has_lm_head)
  if has_lm_head:
    out["decoder/logits_dense/kernel"] = (get("lm_head.weight").T * scale).astype(embedding.dtype)
  elif scale == 1.0:
    out["decoder/logits_dense/kernel"] = embedding.T
  get.check_all_used(ignored=(r"(encoder|decoder)\.embed_tokens\.weight", r"lm_head\.weight"))
  return out


def _vision_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
  return config.get("vision_config", config) if config else {}


def vit_config_from_hf(path_or_config: Any, **overrides) -> ViTConfig:
  """Our `ViTConfig` for a transformers SigLIP vision checkpoint (folder, file or dict).

  `overrides` set ViTConfig fields the checkpoint does not decide (`adapt`,
  `dtype`, or another `image_size`: position embeddings are then resampled).
  """
  config = (dict(path_or_config) if isinstance(path_or_config, Mapping)
            else read_hf_config(path_or_config))
  vision = _vision_config(config)
  if not vision:
    raise ValueError(f"no config.json beside {path_or_config}")
  # Our ViT fixes these to SigLIP's values; anything else would import silently wrong.
  fixed = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "num_channels": 3}
  for key, value in fixed.items():
    if vision.get(key, value) != value:
      raise ValueError(f"SigLIP checkpoint has {key}={vision[key]!r}; our ViT implements "
                       f"{value!r}")
  fields = dict(width=vision["hidden_size"], depth=vision["num_hidden_layers"],
                mlp_dim=vision["intermediate_size"], num_heads=vision["num_attention_heads"],
                patch_size=vision["patch_size"], image_size=vision["image_size"])
  return ViTConfig(**{**fields, **overrides})


def siglip_vision_from_hf(tensors: Mapping[str, np.ndarray],
                          config: Optional[Mapping[str, Any]] = None,
                          num_heads: Optional[int] = None) -> Flat:
  """SigLIP vision tower tensors -> our big_vision-layout ViT `{path: array}`.

  The attention-pooling head (`head.*`) is not part of the tower we adapt and is
  skipped, as is anything outside the vision model (a SiglipModel's text tower).
  """
  num_heads = num_heads or _vision_config(config or {}).get("num_attention_heads")
  if not num_heads:
    raise ValueError("SigLIP import needs the number of attention heads: save config.json "
                     "beside the weights or pass num_heads")
  patch_name = next(n for n in tensors if n.endswith("embeddings.patch_embedding.weight"))
  root = patch_name[: -len("embeddings.patch_embedding.weight")]
  get = _Consumer({n[len(root):]: v for n, v in tensors.items() if n.startswith(root)},
                  "SigLIP vision")
  out: Flat = {}
  # conv [out, in, kh, kw] -> [kh, kw, in, out]
  out["embedding/kernel"] = get("embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)
  out["embedding/bias"] = get("embeddings.patch_embedding.bias")
  out["pos_embedding"] = get("embeddings.position_embedding.weight")[None]

  for i in _layer_indices(get.tensors, r"encoder\.layers\.(\d+)\."):
    src, dst = f"encoder.layers.{i}", f"Transformer/encoderblock_{i}"
    for hf, ours in SIGLIP_NORMS:
      out[f"{dst}/{ours}/scale"] = get(f"{src}.{hf}.weight")
      out[f"{dst}/{ours}/bias"] = get(f"{src}.{hf}.bias")
    attn = f"{dst}/MultiHeadDotProductAttention_0"
    for hf, ours in SIGLIP_INPUT_PROJECTIONS:
      weight = get(f"{src}.self_attn.{hf}.weight")
      out[f"{attn}/{ours}/kernel"] = _linear_to_heads_in(weight, num_heads)
      out[f"{attn}/{ours}/bias"] = get(f"{src}.self_attn.{hf}.bias").reshape(num_heads, -1)
    hf, ours = SIGLIP_OUTPUT_PROJECTION
    out[f"{attn}/{ours}/kernel"] = _linear_to_heads_out(get(f"{src}.self_attn.{hf}.weight"),
                                                        num_heads)
    out[f"{attn}/{ours}/bias"] = get(f"{src}.self_attn.{hf}.bias")
    for hf, ours in SIGLIP_MLP:
      out[f"{dst}/MlpBlock_0/{ours}/kernel"] = get(f"{src}.mlp.{hf}.weight").T
      out[f"{dst}/MlpBlock_0/{ours}/bias"] = get(f"{src}.mlp.{hf}.bias")
  out["Transformer/encoder_norm/scale"] = get("post_layernorm.weight")
  out["Transformer/encoder_norm/bias"] = get("post_layernorm.bias")
  get.check_all_used(ignored=(r"head\..*",))
  return out


def load_hf(path: str, model: Optional[str] = None, num_heads: Optional[int] = None) -> Flat:
  """A transformers safetensors checkpoint in our layout.

  Args:
    path: a `.safetensors` file, a `model.safetensors.index.json`, or the folder
      `save_pretrained` wrote.
    model: 't5' or 'siglip_vision'; None decides from the tensor names (a file
      holding both, e.g. PaliGemma-like, must say which).
    num_heads: SigLIP heads when no config.json sits beside the weights.
  """
  if "://" in str(path):
    raise ValueError(f"{path}: safetensors are memory-mapped, so HF checkpoints must be on "
                     "a local disk; copy them first")
  tensors = read_safetensors(path)
  config = read_hf_config(path)
  if model is None:
    found = [m for m, test in (("t5", is_t5), ("siglip_vision", is_siglip_vision))
             if test(tensors)]
    if len(found) != 1:
      raise ValueError(f"{path}: cannot tell which model this safetensors checkpoint holds "
                       f"(found {found or 'neither T5 nor SigLIP'}); pass model=")
    model = found[0]
  if model == "t5":
    return t5_from_hf(tensors, config)
  if model == "siglip_vision":
    return siglip_vision_from_hf(tensors, config, num_heads)
  raise ValueError(f"unknown HF model {model!r}: expected 't5' or 'siglip_vision'")
