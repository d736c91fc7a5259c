"""Input-dependent adapters (Omni-SMoLA, MoLE, ...) export to adapters/<slot>.{safetensors,json}
in our layout, and `read_adapters` reads them back into a model that gives the same logits."""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from model_fixtures import ADAPTER_SPECS, make_batch, param_shapes, random_params
from omni_smola import launching, param_layout
from omni_smola.checkpoints import flatten, load_pretrained, unflatten
from omni_smola.checkpoints.adapter_export import (FORMAT_VERSION, AdapterFormatError,
                                                   read_adapters, write_adapters)
from omni_smola.checkpoints.merge import merge_lora
from omni_smola.export import check_modes, export_params
from omni_smola.model import PaliModel
from omni_smola.nn import AdapterPlan, AdapterSpec

# The MLPs and the cross-attention's query only: compiling the tiny PaLI with an Omni-SMoLA
# on every projection takes seconds.
SITES = ("mlp/", "encoder_decoder_attention/query")
OMNI = AdapterPlan(adapter=dataclasses.replace(ADAPTER_SPECS["omni_smola_sequence"],
                                               sites=SITES))
# MoLE as the generalist with a LoRA specialist over it: --merge folds the LoRA, MoLE stays.
MOLE_LORA = AdapterPlan(adapter=dataclasses.replace(ADAPTER_SPECS["mole"], sites=SITES),
                        specialist_adapter=AdapterSpec(kind="lora", rank=2, alpha=4.0,
                                                       sites=("mlp/wo",)))


def _model_and_params(plan):
  model = PaliModel("tiny", plan)
  batch = make_batch(model)
  return model, batch, flatten(random_params(model, batch))


def _logits(model, params, batch):
  # Jitted: a compile of the tiny PaLI costs less than running it op by op.
  return np.asarray(jax.jit(lambda p: model._logits(p, batch))(params))  # pylint: disable=protected-access


def _slot(flat, plan, slot):
  return {n: v for n, v in flat.items()
          if (p := param_layout.adapter_position(n, plan)) is not None and p.slot == slot}


@pytest.mark.parametrize("plan, mode", [(OMNI, "adapters"), (MOLE_LORA, "merge")],
                         ids=["omni_smola", "mole_beside_merged_lora"])
def test_exported_adapters_read_back_to_the_same_arrays_spec_and_logits(plan, mode, tmp_path):
  model, batch, flat = _model_and_params(plan)
  out = tmp_path / "export"
  record = export_params(flat, model.config, plan, str(out), **{mode: True})
  assert record["adapters"] == ["adapter"]
  assert sorted(os.listdir(out / "adapters")) == ["adapter.json", "adapter.safetensors"]

  arrays, spec = read_adapters(str(out / "adapters"), "adapter")
  assert spec == plan.adapter
  expected = _slot(flat, plan, "adapter")
  assert sorted(arrays) == sorted(expected)
  for name, value in expected.items():
    assert (arrays[name].dtype, arrays[name].shape) == (value.dtype, value.shape), name
    np.testing.assert_array_equal(arrays[name], value, err_msg=name)
  if spec.kind == "omni_smola":
    assert "text/encoder/layers_0/mlp/wi_0/adapter/mm/experts/expert_a" in arrays
    assert "text/decoder/layers_1/mlp/wo/adapter/mm/router/slot_params" in arrays

  # Restore into a model built from the read-back spec: the backbone (LoRA merged, for
  # --merge) plus the read-back adapters.
  if mode == "merge":
    backbone_flat, run_plan = merge_lora(flat, plan).params, AdapterPlan(adapter=spec)
  else:
    backbone_flat, run_plan = flat, AdapterPlan(adapter=spec)
  backbone = {n: v for n, v in backbone_flat.items() if not param_layout.is_adapter_path(n)}
  back_model = PaliModel("tiny", run_plan)
  restored = load_pretrained(nn.unbox(param_shapes(back_model, batch)), {**backbone, **arrays})
  restored_flat = {n: np.asarray(v) for n, v in flatten(restored).items()}
  if mode == "adapters":
    assert sorted(restored_flat) == sorted(flat)
    for name, value in flat.items():
      np.testing.assert_array_equal(restored_flat[name], value, err_msg=name)
  for name, value in arrays.items():
    np.testing.assert_array_equal(restored_flat[name], value, err_msg=name)
  if mode == "adapters":
    # The same module (the spec read back equals the original), so one compile serves both.
    assert back_model.module == model.module
    forward = jax.jit(lambda p: back_model._logits(p, batch))  # pylint: disable=protected-access
    np.testing.assert_array_equal(np.asarray(forward(restored)),
                                  np.asarray(forward(unflatten(flat))))
  else:  # a merged kernel rounds otherwise than kernel + LoRA (random weights, logits ~1)
    np.testing.assert_allclose(_logits(back_model, restored, batch),
                               _logits(model, unflatten(flat), batch), atol=5e-4, rtol=5e-4)


def test_a_scanned_model_writes_the_same_per_layer_tensors(tmp_path):
  flat = _model_and_params(OMNI)[2]
  write_adapters(str(tmp_path / "unrolled"), flat, OMNI)
  write_adapters(str(tmp_path / "scanned"), param_layout.stack_layers(flat), OMNI)
  for name in ("adapter.safetensors", "adapter.json"):
    assert ((tmp_path / "scanned" / name).read_bytes()
            == (tmp_path / "unrolled" / name).read_bytes()), name
  arrays, _ = read_adapters(str(tmp_path / "scanned"))
  assert all("layers_" in n or "encoderblock_" in n for n in arrays)


def test_a_slot_not_in_the_directory_is_an_error_naming_the_file_and_the_slots_there(tmp_path):
  write_adapters(str(tmp_path), {"text/encoder/layers_0/mlp/wo/adapter/lora_a": np.ones((2, 2)),
                                 "text/encoder/layers_0/mlp/wo/adapter/lora_b": np.ones((2, 2))},
                 AdapterPlan(adapter=AdapterSpec(kind="lora", rank=2)))
  missing = os.path.join(str(tmp_path), "specialist_adapter.json")
  with pytest.raises(AdapterFormatError, match=f"{missing} does not exist.*it has adapter"):
    read_adapters(str(tmp_path), "specialist_adapter")


def test_an_unknown_format_version_is_an_error_naming_the_file(tmp_path):
  plan = AdapterPlan(adapter=AdapterSpec(kind="lora", rank=2))
  write_adapters(str(tmp_path), {"mlp/wo/adapter/lora_a": np.ones((2, 2)),
                                 "mlp/wo/adapter/lora_b": np.ones((2, 2))}, plan)
  path = tmp_path / "adapter.json"
  record = json.loads(path.read_text())
  assert record["format_version"] == FORMAT_VERSION and record["spec"]["kind"] == "lora"
  path.write_text(json.dumps(dict(record, format_version=FORMAT_VERSION + 1)))
  with pytest.raises(AdapterFormatError, match=f"{path} has format_version {FORMAT_VERSION + 1}"):
    read_adapters(str(tmp_path))


@pytest.mark.parametrize("plan, merge, adapters, message", [
    (OMNI, True, False, "--merge: the model has no LoRA to merge.*--adapters"),
    (AdapterPlan(), False, True, "--adapters: the model has no adapter"),
    (OMNI, False, False, "--merge.*--peft.*--adapters"),
])
def test_adapter_modes_that_cannot_work_are_flag_errors(plan, merge, adapters, message):
  with pytest.raises(launching.FlagError, match=message):
    check_modes(plan, merge, False, adapters)
