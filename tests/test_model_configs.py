"""gin binds the model config's fields and the adapter plan; bad bindings stop at parse time."""
import dataclasses

import gin
import pytest

from omni_smola import launching, param_layout
from omni_smola.model import PaliModel
from omni_smola.models import configs
from omni_smola.nn import SLOT_NAMES, AdapterConfigError, AdapterPlan, AdapterSpec


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _model(files, bindings=()):
  launching.parse_gin(files, list(bindings))
  return gin.query_parameter("%MODEL").scoped_configurable_fn()


def test_an_experiment_changes_one_field_and_keeps_the_rest():
  model = _model(["models/pali3.gin"], ["omni_smola.models.configs.T5Config.dtype = 'bfloat16'",
                                        "ViTConfig.remat = True"])
  pali3 = configs.CONFIGS["pali3"]
  assert model.config.text == dataclasses.replace(pali3.text, dtype="bfloat16")
  assert model.config.vision == dataclasses.replace(pali3.vision, remat=True)
  assert model.config_name is None  # no longer the named size; reports say "custom"


def test_a_field_the_config_does_not_have_is_a_parse_error_naming_it():
  with pytest.raises(launching.GinConfigError, match=r"T5Config.*width"):
    launching.parse_gin(["models/tiny.gin"], ["T5Config.width = 3"])


def test_config_bindings_next_to_a_named_config_would_be_ignored_so_they_stop_the_build():
  gin.parse_config("import omni_smola.models.configs\nT5Config.dtype = 'bfloat16'")
  with pytest.raises(ValueError, match=r"'tiny' is a fixed named config.*T5Config.dtype"):
    PaliModel("tiny")


def test_the_adapter_plan_is_bound_slot_by_slot_and_an_unknown_slot_is_refused():
  launching.parse_gin(["models/tiny.gin", "adapters/omni_smola.gin", "runs/specialist.gin"],
                      ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'mini_shapes_count'",
                       "TRAIN_STEPS = 1", "INITIAL_CHECKPOINT_PATH = '/generalist'"])
  plan = gin.query_parameter("train.model").scoped_configurable_fn().adapters
  assert [(slot, spec.kind) for slot, spec in plan.items()] == [
      ("adapter", "omni_smola"), ("specialist_adapter", "lora")]
  gin.clear_config()
  with pytest.raises(launching.GinConfigError, match=r"AdapterPlan.*specialst_adapter"):
    launching.parse_gin(["models/tiny.gin", "adapters/lora.gin"],
                        ["AdapterPlan.specialst_adapter = @AdapterSpec()"])
  with pytest.raises(AdapterConfigError, match="AdapterPlan.adapter must be an AdapterSpec"):
    AdapterPlan(adapter="lora")


def test_every_slot_is_an_adapter_position_in_the_parameter_layout():
  plan = AdapterPlan(**{slot: AdapterSpec(kind="lora") for slot in SLOT_NAMES})
  site = "text/encoder/layers_0/mlp/wi_0"
  for slot in SLOT_NAMES:
    position = param_layout.adapter_position(f"{site}/{slot}/lora_a", plan)
    assert (position.site, position.slot) == (site, slot)
    assert param_layout.is_adapter_path(f"{site}/{slot}/lora_a")
  assert param_layout.adapter_position(f"{site}/adapter/mm/a", plan).component == "mm"
  assert param_layout.adapter_position(f"{site}/adapter/lora_a", plan).component == "lora"
  assert param_layout.adapter_position(f"{site}/specialist_adapter/a", plan).component == (
      "specialist")
  assert param_layout.adapter_position(f"{site}/kernel", plan) is None
  assert not param_layout.is_adapter_path(f"{site}/kernel")
