"""Our backbone back to `transformers` files: the inverse of `hf_safetensors`' importers.

* the text model (T5X layout) -> `T5ForConditionalGeneration`;
* the ViT (big_vision layout) -> `SiglipVisionModel`.

Names come from `hf_safetensors`' tables (`T5_SUBLAYERS`, `SIGLIP_NORMS`, ...), read
the other way; layouts are the importers' reshapes undone: our `[in, out]` kernels
become torch's `[out, in]`, attention's `[embed, heads, kv]` query/key/value
`[heads * kv, embed]` and its `[heads, kv, embed]` output `[embed, heads * kv]`.

The output layer follows `hf_safetensors.t5_from_hf`'s reading: a model with
`logits_via_embedding` is a tied T5 whose decoder output is scaled by
`d_model**-0.5` (`tie_word_embeddings` / `scale_decoder_outputs` true, no
`lm_head`); a model with its own `logits_dense` writes it as an unscaled
`lm_head` beside `shared` (T5.1.1's files; transformers 5 keeps a `lm_head` that
differs from `shared` untied).
"""
import json
import os
import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np
from safetensors.numpy import save_file

from omni_smola.checkpoints import hf_safetensors as hf
from omni_smola.checkpoints.tree import Flat
from omni_smola.models.configs import T5Config, ViTConfig

CONFIG_NAME = "config.json"
_T5_ACTIVATIONS = {"gelu": "gated-gelu", "silu": "gated-silu"}


def _heads_in_to_linear(kernel: np.ndarray) -> np.ndarray:
  """`[embed, heads, kv]` -> torch `[heads * kv, embed]`."""
  return np.asarray(kernel).reshape(kernel.shape[0], -1).T


def _heads_out_to_linear(kernel: np.ndarray) -> np.ndarray:
  """`[heads, kv, embed]` -> torch `[embed, heads * kv]`."""
  return np.asarray(kernel).reshape(-1, kernel.shape[-1]).T


class _Producer:
  """Hands out our arrays by path and remembers which were used (none may be left)."""

  def __init__(self, flat: Mapping[str, Any], what: str):
    self.flat, self.what, self.used = flat, what, set()

  def __call__(self, path: str) -> np.ndarray:
    if path not in self.flat:
      raise KeyError(f"{self.what} export: the parameters have no '{path}'")
    self.used.add(path)
    return np.asarray(self.flat[path])

  def check_all_used(self):
    left = sorted(set(self.flat) - self.used)
    if left:
      raise ValueError(f"{self.what} export: parameters with no place in the HF model "
                       f"(adapters left unmerged?): {left[:10]}{' ...' if len(left) > 10 else ''}")


def hf_t5_module(site: str) -> str:
  """The HF module of one of our T5 projections: `encoder/layers_3/attention/query` ->
  `encoder.block.3.layer.0.SelfAttention.q` (a leading `text/` is ignored)."""
  match = re.fullmatch(r"(?:text/)?(encoder|decoder)/layers_(\d+)/(\w+)/(\w+)", site)
  if match:
    stack, layer, module, projection = match.groups()
    names = dict((ours, theirs) for theirs, ours in
                 hf.T5_INPUT_PROJECTIONS + (hf.T5_OUTPUT_PROJECTION,))
    names.update((n, n) for n in hf.T5_MLP_PROJECTIONS)
    for j, (_, hf_module, ours) in enumerate(hf.T5_SUBLAYERS[stack]):
      if ours == module and projection in names:
        return f"{stack}.block.{layer}.layer.{j}.{hf_module}.{names[projection]}"
  raise ValueError(f"{site} is not a T5 projection transformers' T5 has")


def t5_to_hf(flat: Mapping[str, Any], config: T5Config) -> Tuple[Dict[str, np.ndarray], dict]:
  """Our text model's `{path: array}` (T5X layout, no `text/` prefix) -> HF tensors and
  the `config.json` of a `T5ForConditionalGeneration`."""
  if config.mlp_activation not in _T5_ACTIVATIONS:
    raise ValueError(f"T5Config.mlp_activation={config.mlp_activation!r} has no HF T5 "
                     f"equivalent (known: {sorted(_T5_ACTIVATIONS)})")
  get = _Producer(flat, "T5")
  out: Dict[str, np.ndarray] = {"shared.weight": get("token_embedder/embedding")}
  layers = {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
  for stack, count in layers.items():
    for i in range(count):
      src, dst = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
      for j, (norm, hf_module, module) in enumerate(hf.T5_SUBLAYERS[stack]):
        out[f"{dst}.{j}.layer_norm.weight"] = get(f"{src}/{norm}/scale")
        prefix, ours = f"{dst}.{j}.{hf_module}", f"{src}/{module}"
        if module == "mlp":
          for name in hf.T5_MLP_PROJECTIONS:
            out[f"{prefix}.{name}.weight"] = get(f"{ours}/{name}/kernel").T
          continue
        for theirs, name in hf.T5_INPUT_PROJECTIONS:
          out[f"{prefix}.{theirs}.weight"] = _heads_in_to_linear(get(f"{ours}/{name}/kernel"))
        theirs, name = hf.T5_OUTPUT_PROJECTION
        out[f"{prefix}.{theirs}.weight"] = _heads_out_to_linear(get(f"{ours}/{name}/kernel"))
    out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = get(
        f"{stack}/relpos_bias/rel_embedding").T
    norm = "encoder_norm" if stack == "encoder" else "decoder_norm"
    out[f"{stack}.final_layer_norm.weight"] = get(f"{stack}/{norm}/scale")
  tied = config.logits_via_embedding
  if not tied:
    out["lm_head.weight"] = get("decoder/logits_dense/kernel").T
  get.check_all_used()
  hf_config = dict(
      architectures=["T5ForConditionalGeneration"], model_type="t5",
      d_model=config.emb_dim, d_kv=config.head_dim, num_heads=config.num_heads,
      d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
      num_decoder_layers=config.num_decoder_layers, vocab_size=config.vocab_size,
      feed_forward_proj=_T5_ACTIVATIONS[config.mlp_activation],
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance,
      layer_norm_epsilon=config.layer_norm_epsilon, dropout_rate=0.0,
      is_encoder_decoder=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
      # transformers 4 reads both from `tie_word_embeddings`; 5 from `scale_decoder_outputs`.
      tie_word_embeddings=tied, scale_decoder_outputs=tied)
  return out, hf_config


def siglip_vision_to_hf(flat: Mapping[str, Any], config: ViTConfig
                        ) -> Tuple[Dict[str, np.ndarray], dict]:
  """Our ViT's `{path: array}` (big_vision layout, no `img/` prefix) -> the tensors and
  `config.json` of a `SiglipVisionModel` (no attention-pooling head: ours has none)."""
  get = _Producer(flat, "SigLIP vision")
  out: Dict[str, np.ndarray] = {}
  # [kh, kw, in, out] -> conv [out, in, kh, kw]
  out["embeddings.patch_embedding.weight"] = get("embedding/kernel").transpose(3, 2, 0, 1)
  out["embeddings.patch_embedding.bias"] = get("embedding/bias")
  out["embeddings.position_embedding.weight"] = get("pos_embedding")[0]
  for i in range(config.depth):
    src, dst = f"Transformer/encoderblock_{i}", f"encoder.layers.{i}"
    for theirs, ours in hf.SIGLIP_NORMS:
      out[f"{dst}.{theirs}.weight"] = get(f"{src}/{ours}/scale")
      out[f"{dst}.{theirs}.bias"] = get(f"{src}/{ours}/bias")
    attn = f"{src}/MultiHeadDotProductAttention_0"
    for theirs, ours in hf.SIGLIP_INPUT_PROJECTIONS:
      out[f"{dst}.self_attn.{theirs}.weight"] = _heads_in_to_linear(get(f"{attn}/{ours}/kernel"))
      out[f"{dst}.self_attn.{theirs}.bias"] = get(f"{attn}/{ours}/bias").reshape(-1)
    theirs, ours = hf.SIGLIP_OUTPUT_PROJECTION
    out[f"{dst}.self_attn.{theirs}.weight"] = _heads_out_to_linear(get(f"{attn}/{ours}/kernel"))
    out[f"{dst}.self_attn.{theirs}.bias"] = get(f"{attn}/{ours}/bias")
    for theirs, ours in hf.SIGLIP_MLP:
      out[f"{dst}.mlp.{theirs}.weight"] = get(f"{src}/MlpBlock_0/{ours}/kernel").T
      out[f"{dst}.mlp.{theirs}.bias"] = get(f"{src}/MlpBlock_0/{ours}/bias")
  out["post_layernorm.weight"] = get("Transformer/encoder_norm/scale")
  out["post_layernorm.bias"] = get("Transformer/encoder_norm/bias")
  get.check_all_used()
  hf_config = dict(
      architectures=["SiglipVisionModel"], model_type="siglip_vision_model",
      hidden_size=config.width, intermediate_size=config.mlp_dim,
      num_hidden_layers=config.depth, num_attention_heads=config.num_heads,
      patch_size=config.patch_size, image_size=config.image_size, num_channels=3,
      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
      vision_use_head=False)
  return {f"vision_model.{name}": value for name, value in out.items()}, hf_config


def subtree(flat: Mapping[str, Any], prefix: str) -> Flat:
  """The parameters under `prefix/`, with it stripped."""
  start = prefix.rstrip("/") + "/"
  return {path[len(start):]: value for path, value in flat.items() if path.startswith(start)}


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  """A safetensors file transformers accepts (contiguous arrays, `format: pt`)."""
  save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()}, path,
            metadata={"format": "pt"})
  os.chmod(path, 0o666 & ~_umask())  # safetensors creates its files private (0600)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_hf_model(directory: str, tensors: Mapping[str, np.ndarray],
                   config: Mapping[str, Any]) -> None:
  """`model.safetensors` and `config.json`: what `from_pretrained(directory)` reads."""
  os.makedirs(directory, exist_ok=True)
  write_safetensors(os.path.join(directory, hf.SINGLE_NAME), tensors)
  dtypes = {str(np.asarray(v).dtype) for v in tensors.values()}
  config = dict(config, torch_dtype=dtypes.pop() if len(dtypes) == 1 else "float32")
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
