"""Merging and export: merged LoRA gives the same logits with no LoRA left (input-dependent
adapters stay); exported files, read by transformers and peft, give our logits; our importer
reads them back.

One file, so the eagerly-run forwards share their compiled operations."""
import dataclasses
import json
import logging
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from export_fixtures import (DECODER_TOKENS, ENCODER_TOKENS, IMAGES, TEXT, VISION,  # noqa: E402
                             pali_model, random_params, text_logits, text_model)
from omni_smola.checkpoints import load_hf, unflatten  # noqa: E402
from omni_smola.checkpoints import peft_export  # noqa: E402
from omni_smola.checkpoints.merge import NothingToMergeError, merge_lora  # noqa: E402
from omni_smola.export import export_params  # noqa: E402
from omni_smola.models.configs import PaliConfig  # noqa: E402
from omni_smola.nn import AdapterPlan, AdapterSpec  # noqa: E402

LORA = AdapterSpec(kind="lora", rank=2, alpha=6.0, sites=(".*",))
# alpha != rank, so a merge that forgets alpha / r is caught; `attention/out` and
# `encoder_decoder_attention/out` have two input axes [heads, kv], `query` two output axes.
MERGE_LORA = AdapterSpec(kind="lora", rank=2, alpha=6.0,
                         sites=("attention/query", "attention/out", "mlp/wi_0", "mlp/wo"))


def _torch_t5_logits(directory):
  model = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
  with torch.no_grad():
    return model(input_ids=torch.tensor(ENCODER_TOKENS),
                 attention_mask=torch.tensor(ENCODER_TOKENS > 0),
                 decoder_input_ids=torch.tensor(DECODER_TOKENS)).logits.numpy()


def _image_tower(module, images):
  patches = module.img(images)
  return patches[0] if isinstance(patches, tuple) else patches  # (x, out) or x


def test_merged_pali_exports_to_t5_and_siglip_that_give_our_numbers(tmp_path):
  plan = AdapterPlan(adapter=LORA)
  model = pali_model(plan)
  params = random_params(model, IMAGES, ENCODER_TOKENS, DECODER_TOKENS)
  assert any(p.startswith("img/") and "/adapter/" in p for p in params)  # the ViT is adapted
  ours_logits, ours_patches = jax.jit(lambda p: model.apply(
      {"params": p}, IMAGES, ENCODER_TOKENS, DECODER_TOKENS,
      method=lambda m, x, e, d: (m.text(e, d), _image_tower(m, x))))(unflatten(params))

  out = tmp_path / "export"
  record = export_params(params, PaliConfig(text=TEXT, vision=VISION), plan, str(out),
                         merge=True)
  assert record["merged"] == {"adapter": 7 * 2 + 11 * 2 + 6 * 2}  # T5 enc, T5 dec, ViT
  assert sorted(os.listdir(out)) == ["export.json", "img_projection.safetensors", "merged",
                                     "text", "vision"]
  np.testing.assert_allclose(_torch_t5_logits(str(out / "text")), ours_logits,
                             atol=1e-4, rtol=1e-4)
  vision = transformers.SiglipVisionModel.from_pretrained(str(out / "vision")).eval()
  with torch.no_grad():
    patches = vision(pixel_values=torch.tensor(IMAGES.transpose(0, 3, 1, 2))).last_hidden_state
  np.testing.assert_allclose(patches.numpy(), ours_patches, atol=1e-4, rtol=1e-4)
  # Our importer reads the export back to the merged parameters, exactly.
  merged = merge_lora(params, plan).params
  for tower, prefix in (("text", "text/"), ("vision", "img/")):
    back = load_hf(str(out / tower))
    assert sorted(prefix + p for p in back) == sorted(p for p in merged if p.startswith(prefix))
    for path, value in back.items():
      np.testing.assert_array_equal(value, merged[prefix + path], err_msg=path)


def test_tied_gated_silu_t5_round_trips_through_transformers(tmp_path):
  """The other output layer (the Pali test has the separate one) and UL2's activation."""
  config = dataclasses.replace(TEXT, logits_via_embedding=True, mlp_activation="silu")
  params = random_params(text_model(AdapterPlan(), config), ENCODER_TOKENS, DECODER_TOKENS)
  export_params(params, PaliConfig(text=config), AdapterPlan(), str(tmp_path / "e"))
  hf_config = json.loads((tmp_path / "e" / "text" / "config.json").read_text())
  assert hf_config["tie_word_embeddings"] and hf_config["feed_forward_proj"] == "gated-silu"
  np.testing.assert_allclose(_torch_t5_logits(str(tmp_path / "e" / "text")),
                             text_logits(AdapterPlan(), params, config), atol=1e-4, rtol=1e-4)
  back = load_hf(str(tmp_path / "e" / "text"))
  assert sorted(back) == sorted(params)
  for path, value in back.items():
    np.testing.assert_array_equal(value, params[path], err_msg=path)


def test_lora_in_peft_format_loads_with_peft_and_gives_our_logits(tmp_path):
  peft = pytest.importorskip("peft")
  spec = AdapterSpec(kind="lora", rank=2, alpha=6.0,
                     sites=("encoder/layers_0/attention/query", "attention/out", "mlp/wi_1",
                            "decoder/.*/mlp/wo"))
  plan = AdapterPlan(adapter=spec)
  params = random_params(text_model(plan), ENCODER_TOKENS, DECODER_TOKENS)
  out = tmp_path / "export"
  record = export_params(params, PaliConfig(text=TEXT), plan, str(out), peft=True)
  assert record["peft"] == ["adapter"]
  adapter_dir = out / "peft" / "adapter"
  adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
  assert adapter_config["r"] == 2 and adapter_config["lora_alpha"] == 6.0
  # Not every q is adapted, so peft gets module paths, not names.
  assert "encoder.block.0.layer.0.SelfAttention.q" in adapter_config["target_modules"]
  assert "encoder.block.1.layer.0.SelfAttention.q" not in adapter_config["target_modules"]
  from safetensors.numpy import load_file
  tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
  a = tensors["base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"]
  np.testing.assert_array_equal(a, params["encoder/layers_0/attention/query/adapter/lora_a"].T)
  assert "base_model.model.decoder.block.1.layer.1.EncDecAttention.o.lora_B.weight" in tensors

  base = transformers.T5ForConditionalGeneration.from_pretrained(str(out / "text"))
  model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(ENCODER_TOKENS),
                   attention_mask=torch.tensor(ENCODER_TOKENS > 0),
                   decoder_input_ids=torch.tensor(DECODER_TOKENS)).logits.numpy()
  np.testing.assert_allclose(logits, text_logits(plan, params), atol=1e-4, rtol=1e-4)


def test_peft_target_modules_are_the_projection_names_when_every_one_is_adapted():
  params = random_params(text_model(AdapterPlan(adapter=LORA)), ENCODER_TOKENS, DECODER_TOKENS)
  _, adapter_config = peft_export.t5_lora_to_peft(params, "adapter", LORA, TEXT)
  assert adapter_config["target_modules"] == ["k", "o", "q", "v", "wi_0", "wi_1", "wo"]


# ---------------------------------------------------------------------------- merging


def _params(plan, seed=0):
  return random_params(text_model(plan), ENCODER_TOKENS, DECODER_TOKENS, seed=seed)


def test_merged_kernels_are_the_kernel_plus_scaled_lora_product_and_lora_is_gone():
  """The logits check is the export test's (merged Pali -> transformers); this one pins the
  layout: `attention/out` [heads, kv, embed] takes A B over its flattened `heads * kv`."""
  plan = AdapterPlan(adapter=MERGE_LORA)
  params = _params(plan)
  result = merge_lora(params, plan)
  assert not [p for p in result.params if "/adapter/" in p]
  assert result.plan == AdapterPlan()
  # 2 encoder layers x (query, out, wi_0, wo) + 2 decoder layers x (2 x query, 2 x out, ...).
  assert result.merged == {"adapter": 2 * 4 + 2 * 6}
  site = "decoder/layers_1/encoder_decoder_attention/out"
  kernel = params[f"{site}/kernel"]
  a, b = params[f"{site}/adapter/lora_a"], params[f"{site}/adapter/lora_b"]
  heads, kv, embed = kernel.shape
  expected = kernel + 3.0 * np.einsum("hkr,re->hke", a.reshape(heads, kv, -1), b)
  np.testing.assert_allclose(result.params[f"{site}/kernel"], expected, atol=1e-6)
  unadapted = "encoder/layers_0/attention/key/kernel"
  np.testing.assert_array_equal(result.params[unadapted], params[unadapted])


def test_specialist_lora_merges_over_a_kept_smola_generalist(caplog):
  # The specialist's LoRA and the generalist's SMoLA on one kernel (`mlp/wi_0`) too.
  smola = AdapterSpec(kind="smola", num_experts=2, rank=2, sites=("encoder/.*/mlp/wi_0",))
  plan = AdapterPlan(adapter=smola, specialist_adapter=MERGE_LORA)
  config = dataclasses.replace(TEXT, num_encoder_layers=1, num_decoder_layers=1)  # compiles faster
  params = random_params(text_model(plan, config), ENCODER_TOKENS, DECODER_TOKENS, seed=1)
  with caplog.at_level(logging.INFO):
    result = merge_lora(params, plan)
  assert result.plan == AdapterPlan(adapter=smola)
  assert result.kept == {"adapter": "smola"}
  assert not [p for p in result.params if "/specialist_adapter/" in p]
  smola_params = [p for p in params if "/adapter/" in p]
  assert smola_params and all(
      np.array_equal(result.params[p], params[p]) for p in smola_params)
  assert any("adapter" in r.getMessage() and "smola" in r.getMessage()
             and "cannot be merged" in r.getMessage() for r in caplog.records)
  np.testing.assert_allclose(text_logits(result.plan, result.params, config),
                             text_logits(plan, params, config), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plan, named", [
    (AdapterPlan(), "no adapter at all"),
    (AdapterPlan(adapter=AdapterSpec(kind="mole", num_experts=2, top_k=1)), "adapter: mole"),
])
def test_merging_a_model_without_lora_is_an_error_naming_that(plan, named):
  with pytest.raises(NothingToMergeError, match=f"no LoRA adapter.*{named}"):
    merge_lora({"encoder/layers_0/mlp/wo/kernel": np.zeros((2, 2))}, plan)


def test_a_lora_slot_absent_from_the_parameters_is_an_error_naming_the_slot():
  plan = AdapterPlan(adapter=MERGE_LORA)
  params = _params(AdapterPlan())
  with pytest.raises(NothingToMergeError, match="no LoRA of slot 'adapter'"):
    merge_lora(params, plan)
