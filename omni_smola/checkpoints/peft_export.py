"""A LoRA slot of the text model in `peft`'s format, for the exported `T5ForConditionalGeneration`.

peft's LoRA computes `W x + (lora_alpha / r) B(A(x))` with torch Linear factors
`lora_A.weight` `[r, d]` and `lora_B.weight` `[f, r]`; ours is `(alpha / r) x A B`
with `A` `[d, r]` and `B` `[r, f]`. So peft's factors are ours transposed, and
`lora_alpha = alpha`. The flattened `d` and `f` of an attention projection are
`heads * kv` in the same order as the HF kernel (`hf_export`), so no reshuffle.

Files (what `PeftModel.from_pretrained(t5, directory)` reads):
`adapter_model.safetensors`, keys `base_model.model.<HF module>.lora_{A,B}.weight`
(`base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight`), and
`adapter_config.json`. `target_modules` are the HF projection names (q, k, v, o,
wi_0, wi_1, wo) when the LoRA adapts every projection of those names, else the
full module paths, so peft adds no LoRA where ours has none.
"""
import json
import os
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from omni_smola.checkpoints import hf_export
from omni_smola.checkpoints import hf_safetensors as hf
from omni_smola.models.configs import T5Config
from omni_smola.nn.adapter_spec import AdapterSpec

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."


def _t5_projection_modules(config: T5Config) -> list:
  """The HF module paths of every projection a LoRA may adapt in this T5."""
  modules = []
  for stack, count in (("encoder", config.num_encoder_layers),
                       ("decoder", config.num_decoder_layers)):
    for i in range(count):
      for site in _t5_sites(stack, i):
        modules.append(hf_export.hf_t5_module(site))
  return modules


def _t5_sites(stack: str, layer: int) -> list:
  projections = [ours for _, ours in hf.T5_INPUT_PROJECTIONS + (hf.T5_OUTPUT_PROJECTION,)]
  sites = []
  for _, _, module in hf.T5_SUBLAYERS[stack]:
    names = hf.T5_MLP_PROJECTIONS if module == "mlp" else projections
    sites += [f"{stack}/layers_{layer}/{module}/{name}" for name in names]
  return sites


def t5_lora_to_peft(flat: Mapping[str, Any], slot: str, spec: AdapterSpec,
                    config: T5Config) -> Tuple[Dict[str, np.ndarray], dict]:
  """The LoRA of `slot` in our text model's `{path: array}` (no `text/` prefix) -> peft's
  tensors and `adapter_config.json`."""
  if spec.kind != "lora":
    raise ValueError(f"slot {slot} holds a {spec.kind} adapter: peft's format holds LoRA "
                     "only (merge it with --merge instead)")
  tensors: Dict[str, np.ndarray] = {}
  suffix = f"/{slot}/lora_a"
  for path in sorted(flat):
    if not path.endswith(suffix):
      continue
    site = path[:-len(suffix)]
    module = _PREFIX + hf_export.hf_t5_module(site)
    tensors[f"{module}.lora_A.weight"] = np.asarray(flat[path]).T
    tensors[f"{module}.lora_B.weight"] = np.asarray(flat[f"{site}/{slot}/lora_b"]).T
  if not tensors:
    raise ValueError(f"the text model's parameters hold no LoRA of slot {slot!r}")
  adapted = {name[len(_PREFIX):-len(".lora_A.weight")] for name in tensors
             if name.endswith(".lora_A.weight")}
  every = _t5_projection_modules(config)
  short = sorted({m.rsplit(".", 1)[1] for m in adapted})
  if {m for m in every if m.rsplit(".", 1)[1] in short} == adapted:
    target_modules = short
  else:
    target_modules = sorted(adapted)
  adapter_config = dict(
      peft_type="LORA", task_type="SEQ_2_SEQ_LM", r=spec.rank,
      lora_alpha=spec.scale * spec.rank, lora_dropout=0.0, target_modules=target_modules,
      bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False,
      init_lora_weights=True, inference_mode=True, modules_to_save=None,
      base_model_name_or_path=None)
  return tensors, adapter_config


def write_peft_adapter(directory: str, tensors: Mapping[str, np.ndarray],
                       adapter_config: Mapping[str, Any]) -> None:
  os.makedirs(directory, exist_ok=True)
  hf_export.write_safetensors(os.path.join(directory, ADAPTER_WEIGHTS_NAME), tensors)
  with open(os.path.join(directory, ADAPTER_CONFIG_NAME), "w") as f:
    json.dump(dict(adapter_config), f, indent=2, sort_keys=True)

