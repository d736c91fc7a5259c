"""Export's bad input: each is an error naming the thing, and nothing is half-written."""
import dataclasses
import os

import gin
import numpy as np
import pytest

from export_fixtures import DECODER_TOKENS, ENCODER_TOKENS, TEXT, random_params, text_model
from omni_smola import launching
from omni_smola.checkpoints import read_orbax
from omni_smola.checkpoints.merge import merge_lora
from omni_smola.checkpoints.restore import CheckpointMismatchError
from omni_smola.checkpoints.staging import OutputExistsError
from omni_smola.export import _save_orbax, check_modes, export, export_params
from omni_smola.model import PaliModel
from omni_smola.models.configs import PaliConfig
from omni_smola.nn import AdapterPlan, AdapterSpec

SMALL = dataclasses.replace(TEXT, num_encoder_layers=1, num_decoder_layers=1)
LORA = AdapterSpec(kind="lora", rank=2, alpha=4.0, sites=("attention/query", "mlp/wo"))
SMOLA = AdapterSpec(kind="smola", num_experts=2, rank=2, sites=("mlp/wo",))


def _leftovers(directory):
  return [n for n in os.listdir(directory) if ".tmp-" in n or ".old-" in n]


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
  """An Orbax checkpoint (our layout) of a tiny T5 with a generalist LoRA, and its params."""
  params = random_params(text_model(AdapterPlan(adapter=LORA), SMALL), ENCODER_TOKENS,
                         DECODER_TOKENS)
  path = str(tmp_path_factory.mktemp("ckpt") / "lora")
  _save_orbax(path, params)
  return path, params


def test_export_of_a_checkpoint_merges_its_lora_and_writes_the_merged_params(
    lora_checkpoint, tmp_path):
  path, params = lora_checkpoint
  model = PaliModel(PaliConfig(text=SMALL), adapters=AdapterPlan(adapter=LORA))
  record = export(model=model, checkpoint_path=path, output_dir=str(tmp_path / "out"),
                  merge=True)
  assert record["merged"] == {"adapter": 2 + 1 + 2}  # query x3 (self, cross), wo x2
  merged = read_orbax(str(tmp_path / "out" / "merged"))
  expected = merge_lora(params, model.adapters).params
  assert sorted(merged) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(merged[name], value, atol=1e-6, err_msg=name)
  assert _leftovers(tmp_path) == []


def test_a_specialist_slot_the_checkpoint_lacks_is_named_and_nothing_is_written(
    lora_checkpoint, tmp_path):
  path, _ = lora_checkpoint
  model = PaliModel(PaliConfig(text=SMALL),
                    adapters=AdapterPlan(adapter=LORA, specialist_adapter=LORA))
  with pytest.raises(CheckpointMismatchError, match="slot 'specialist_adapter'.*lora"):
    export(model=model, checkpoint_path=path, output_dir=str(tmp_path / "out"), merge=True)
  assert os.listdir(tmp_path) == []


def test_a_non_empty_output_directory_is_refused_unless_overwrite(tmp_path):
  params = random_params(text_model(AdapterPlan(), SMALL), ENCODER_TOKENS, DECODER_TOKENS)
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(OutputExistsError, match=f"{out} exists and is not empty.*--overwrite"):
    export_params(params, PaliConfig(text=SMALL), AdapterPlan(), str(out))
  assert os.listdir(out) == ["keep.txt"]
  export_params(params, PaliConfig(text=SMALL), AdapterPlan(), str(out), overwrite=True)
  assert sorted(os.listdir(out)) == ["export.json", "text"]
  assert _leftovers(tmp_path) == []


def test_a_failing_export_leaves_neither_output_nor_temporary_files(tmp_path):
  params = random_params(text_model(AdapterPlan(), SMALL), ENCODER_TOKENS, DECODER_TOKENS)
  del params["decoder/decoder_norm/scale"]  # fails after text/'s first tensors are made
  with pytest.raises(KeyError, match="decoder/decoder_norm/scale"):
    export_params(params, PaliConfig(text=SMALL), AdapterPlan(), str(tmp_path / "out"))
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("plan, merge, peft, message", [
    (AdapterPlan(adapter=LORA), False, False, r"adapters \(adapter: lora\).*--merge.*--peft"),
    (AdapterPlan(adapter=LORA), True, True, "--merge and --peft exclude each other"),
    (AdapterPlan(adapter=SMOLA, specialist_adapter=LORA), False, True,
     "peft's format holds LoRA only.*adapter: smola"),
    (AdapterPlan(), False, True, "--peft: the model has no adapter"),
])
def test_modes_that_cannot_work_are_flag_errors_naming_why(plan, merge, peft, message):
  with pytest.raises(launching.FlagError, match=message):
    check_modes(plan, merge, peft)


def test_export_gin_files_bind_the_binary():
  try:
    launching.parse_gin(["experiments/mini_export.gin", "adapters/lora.gin"],
                        ["CHECKPOINT_PATH = '/ckpt'", "EXPORT_DIR = '/out'"])
    bound = {name: str(gin.query_parameter(f"omni_smola.export.export.{name}"))
             for name in ("model", "checkpoint_path", "output_dir")}
    assert bound == {"model": "%MODEL", "checkpoint_path": "%CHECKPOINT_PATH",
                     "output_dir": "%EXPORT_DIR"}
    assert launching.macro_value("EXPORT_DIR") == "/out"
  finally:
    gin.clear_config()
