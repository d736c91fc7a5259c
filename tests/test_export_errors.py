"""Export's bad input: each is an error naming the thing, and nothing is half-written."""
import dataclasses
import os
import shutil

import gin
import numpy as np
import pytest

from export_fixtures import (DECODER_TOKENS, ENCODER_TOKENS, TEXT, random_params, text_logits,
                             text_model)
from omni_smola import launching
from omni_smola.checkpoints import read_orbax, run_config
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


def _record(directory, **slots):
  """The run's config.gin as the trainer writes it (gin's operative config format), each
  slot given as `AdapterSpec`."""
  lines = []
  for slot, spec in slots.items():
    lines += [f"MODEL/AdapterPlan.{slot} = @{slot}/omni_smola.nn.adapter_spec.AdapterSpec()",
              f"MODEL/{slot}/AdapterSpec.alpha = {spec.alpha!r}",
              f"MODEL/{slot}/AdapterSpec.kind = {spec.kind!r}",
              f"MODEL/{slot}/AdapterSpec.rank = {spec.rank}"]
  with open(os.path.join(directory, run_config.RUN_CONFIG_FILE), "w") as f:
    f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
  """An Orbax checkpoint (our layout) of a tiny T5 with a generalist LoRA, its run's
  record beside it, and its params."""
  params = random_params(text_model(AdapterPlan(adapter=LORA), SMALL), ENCODER_TOKENS,
                         DECODER_TOKENS)
  path = str(tmp_path_factory.mktemp("ckpt") / "lora")
  _save_orbax(path, params)
  _record(path, adapter=LORA)
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


# runs/specialist.gin leaves the specialist's alpha unset; this one was trained at alpha 8.
SPECIALIST = AdapterSpec(kind="lora", rank=2, sites=("attention/query", "mlp/wo"))
TRAINED_SPECIALIST = dataclasses.replace(SPECIALIST, alpha=8.0)


@pytest.fixture(scope="module")
def specialist_checkpoint(tmp_path_factory):
  """A specialist run's checkpoint (a generalist LoRA at alpha 4, a specialist LoRA trained
  at alpha 8) with its record, and its params."""
  plan = AdapterPlan(adapter=LORA, specialist_adapter=TRAINED_SPECIALIST)
  params = random_params(text_model(plan, SMALL), ENCODER_TOKENS, DECODER_TOKENS, seed=1)
  path = str(tmp_path_factory.mktemp("specialist") / "run")
  _save_orbax(path, params)
  _record(path, adapter=LORA, specialist_adapter=TRAINED_SPECIALIST)
  return path, params


def test_a_specialist_merges_at_its_runs_recorded_alpha_to_its_unmerged_logits(
    specialist_checkpoint, tmp_path):
  path, params = specialist_checkpoint
  model = PaliModel(PaliConfig(text=SMALL),
                    adapters=AdapterPlan(adapter=LORA, specialist_adapter=SPECIALIST))
  record = export(model=model, checkpoint_path=path, output_dir=str(tmp_path / "out"),
                  merge=True)
  assert record["merged"] == {"adapter": 5, "specialist_adapter": 5}
  merged = read_orbax(str(tmp_path / "out" / "merged"))
  assert not [name for name in merged if "adapter/" in name]
  trained = AdapterPlan(adapter=LORA, specialist_adapter=TRAINED_SPECIALIST)
  np.testing.assert_allclose(text_logits(AdapterPlan(), merged, SMALL),
                             text_logits(trained, params, SMALL), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field, value, named", [
    ("alpha", 2.0, r"AdapterSpec.alpha = 2.0 \(alpha/r = 1\), but .*config.gin records "
                   r"alpha = 8.0 \(alpha/r = 4\)"),
    ("rank", 3, r"AdapterSpec.rank = 3, but .*config.gin records rank = 2"),
])
def test_a_gin_spec_its_runs_record_contradicts_is_an_error_naming_both_and_the_file(
    specialist_checkpoint, tmp_path, field, value, named):
  path, _ = specialist_checkpoint
  wrong = dataclasses.replace(SPECIALIST, **{field: value})
  model = PaliModel(PaliConfig(text=SMALL),
                    adapters=AdapterPlan(adapter=LORA, specialist_adapter=wrong))
  with pytest.raises(CheckpointMismatchError, match=f"specialist_adapter: gin's {named}"):
    export(model=model, checkpoint_path=path, output_dir=str(tmp_path / "out"), merge=True)
  assert os.listdir(tmp_path) == []


def test_a_checkpoint_without_a_record_is_refused_unless_gins_alpha_is_trusted(
    lora_checkpoint, tmp_path):
  path, params = lora_checkpoint
  unrecorded = str(tmp_path / "unrecorded")
  shutil.copytree(path, unrecorded, ignore=shutil.ignore_patterns(run_config.RUN_CONFIG_FILE))
  model = PaliModel(PaliConfig(text=SMALL), adapters=AdapterPlan(adapter=LORA))
  out = str(tmp_path / "out")
  with pytest.raises(CheckpointMismatchError,
                     match=f"no config.gin beside checkpoint {unrecorded} .*adapter: lora.*"
                           "unrecorded_scale = 'gin'"):
    export(model=model, checkpoint_path=unrecorded, output_dir=out, merge=True)
  assert not os.path.exists(out)
  export(model=model, checkpoint_path=unrecorded, output_dir=out, merge=True,
         unrecorded_scale="gin")
  merged = read_orbax(os.path.join(out, "merged"))
  expected = merge_lora(params, model.adapters).params
  for name, value in expected.items():
    np.testing.assert_allclose(merged[name], value, atol=1e-6, err_msg=name)


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
