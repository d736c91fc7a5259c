"""Routing analysis (`python -m omni_smola.analyze`) of a tiny checkpoint, trainer format."""
import json
import os

import gin
import numpy as np
import pytest

from omni_smola import analyze
from omni_smola.analysis import collect
from omni_smola.nn import AdapterPlan, AdapterSpec
from omni_smola.training import checkpointing, data_iterator

from model_fixtures import make_batch, random_params

TASKS_MODULE = "multidevice_checks.multiprocess_tasks"
EXPERTS = {"mm": 4, "vis": 3, "txt": 2}
LENGTHS = {"inputs": 40, "targets": 8}
BATCH, BATCHES, EXAMPLES_PER_TASK = 6, 3, 16  # the last batch is padded (16 = 6 + 6 + 4)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
  """Random (adapters non-zero) tiny params saved as step 3 of a run, then analysed."""
  model_dir = str(tmp_path_factory.mktemp("run"))
  gin.clear_config()
  analyze.parse_config(["models/tiny.gin", "adapters/omni_smola.gin"], [
      f"CHECKPOINT_PATH = '{model_dir}'", "MIXTURE_OR_TASK_NAME = 'mp_mixture'",
      f"MIXTURE_OR_TASK_MODULE = '{TASKS_MODULE}'", f"TASK_FEATURE_LENGTHS = {LENGTHS!r}",
      f"ANALYSIS_BATCH_SIZE = {BATCH}", f"ANALYSIS_NUM_BATCHES = {BATCHES}",
      f"omni_smola.nn.adapter_spec.AdapterSpec.experts_per_group = {EXPERTS!r}"])
  return analyze_random_checkpoint(model_dir, step=3)


def analyze_random_checkpoint(model_dir, step):
  """The configured model's random params (adapters and routers non-zero) saved as `step`
  of `model_dir`, then `routing.analyze()`: (model, summary)."""
  from omni_smola.analysis import routing
  model = gin.query_parameter("%MODEL").scoped_configurable_fn()
  params = random_params(model, make_batch(model))
  checkpointer = checkpointing.RunCheckpointer(
      model_dir, checkpointing.CheckpointConfig(use_async=False, export_adapters=False))
  checkpointer.save(step, {"step": np.int32(step), "params": params,
                           "opt_state": {"count": np.int32(step)}},
                    {"batches_consumed": step})
  checkpointer.close()
  try:
    summary = routing.analyze()
  finally:
    gin.clear_config()
  return model, summary


def expected_tokens(task):
  """Valid tokens per sequence of the examples the analysis reads, counted directly."""
  cfg = data_iterator.DatasetConfig(task, LENGTHS, split="validation", shuffle=False,
                                    module=TASKS_MODULE)
  rows = list(data_iterator.model_dataset(cfg, 16, num_epochs=1).as_numpy_iterator())
  text = sum(int(np.sum(r["encoder_input_tokens"] > 0)) for r in rows)
  targets = sum(int(np.sum(r["decoder_target_tokens"] > 0)) for r in rows)
  visual = 4 * len(rows)  # tiny: 16 px images, 8 px patches
  encoder = {"mm": visual + text, "vis": visual, "txt": text}
  return len(rows), encoder, {"mm": targets, "txt": targets}


def test_outputs_json_and_valid_png_figures(analysed):
  _, summary = analysed
  output = summary["output_dir"]
  assert output.endswith(os.path.join("analysis", "3"))
  with open(os.path.join(output, "routing.json")) as f:
    written = json.load(f)
  assert written["step"] == 3 and sorted(written["tasks"]) == ["mp_colors", "mp_counts"]
  figures = written["figures"]
  layers = written["layers"]
  heatmaps = [f for f in figures if os.path.basename(f).startswith("load_")]
  assert len(heatmaps) == sum(len(groups) for groups in layers.values())
  assert "figures/entropy_per_layer.png" in figures
  import matplotlib.image
  for figure in figures:
    path = os.path.join(output, figure)
    with open(path, "rb") as f:
      assert f.read(8) == PNG_SIGNATURE, figure
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 50


def test_loads_sum_to_the_valid_tokens_of_every_task_site_and_group(analysed):
  _, summary = analysed
  for task in ("mp_colors", "mp_counts"):
    examples, encoder, decoder = expected_tokens(task)
    assert examples == EXAMPLES_PER_TASK == summary["tasks"][task]["examples"]
    for site, groups in summary["sites"].items():
      # Cross-attention keys / values run on the encoder's tokens.
      on_encoder = "/encoder/" in site or "encoder_decoder_attention/key" in site or (
          "encoder_decoder_attention/value" in site)
      expected = encoder if on_encoder else decoder
      assert set(groups) == set(expected), site
      for group, table in groups.items():
        entry = table["tasks"][task]
        assert table["experts"] == EXPERTS[group]
        assert entry["tokens"] == expected[group], (task, site, group)
        assert sum(entry["load"]) == pytest.approx(expected[group], rel=1e-5)
        assert sum(entry["load_fraction"]) == pytest.approx(1.0, rel=1e-5)
        assert 0.0 <= entry["normalized_entropy"] <= 1.0 + 1e-6
        assert len(entry["top_experts"]) == min(3, EXPERTS[group])


def test_layers_pool_their_sites_and_tasks_pool_into_all(analysed):
  _, summary = analysed
  layer = summary["layers"]["text/encoder/layers_1"]["mm"]
  sites = [s for s in summary["sites"] if s.startswith("text/encoder/layers_1/")]
  assert len(sites) == 7  # q, k, v, out, wi_0, wi_1, wo
  load = np.sum([summary["sites"][s]["mm"]["all"]["load"] for s in sites], axis=0)
  np.testing.assert_allclose(layer["all"]["load"], load, rtol=1e-6)
  per_task = sum(np.asarray(t["load"]) for t in layer["tasks"].values())
  np.testing.assert_allclose(layer["all"]["load"], per_task, rtol=1e-6)
  assert list(summary["layers"]) == ["text/encoder/layers_0", "text/encoder/layers_1",
                                     "text/decoder/layers_0", "text/decoder/layers_1"]


def test_statistics_are_grouped_by_smola_group_or_adapter_kind():
  site = ("text", "decoder", "layers_0", "mlp", "wo")
  kinds = AdapterPlan(adapter=AdapterSpec(kind="mole"), specialist_adapter=AdapterSpec(kind="lora"))
  assert collect.group_of(site + ("adapter", "vis"), kinds) == ("text/decoder/layers_0/mlp/wo",
                                                                "vis")
  assert collect.group_of(site + ("adapter",), kinds) == ("text/decoder/layers_0/mlp/wo",
                                                          "mole")
  assert collect.group_of(site + ("specialist_adapter",), kinds)[1] == "specialist"


def test_a_mome_checkpoint_gives_tower_selection_and_mole_expert_use_per_task(tmp_path):
  """MoVE's router per task (rows sum to one) and MoLE's expert per task and layer, plotted."""
  model_dir = str(tmp_path / "mome")
  gin.clear_config()
  analyze.parse_config(["models/tiny_mome.gin"], [
      f"CHECKPOINT_PATH = '{model_dir}'", "MIXTURE_OR_TASK_NAME = 'mp_mixture'",
      f"MIXTURE_OR_TASK_MODULE = '{TASKS_MODULE}'", f"TASK_FEATURE_LENGTHS = {LENGTHS!r}",
      "ANALYSIS_BATCH_SIZE = 8", "ANALYSIS_NUM_BATCHES = 1"])
  _, summary = analyze_random_checkpoint(model_dir, step=2)  # routers, MoLE's `up` non-zero
  towers = summary["towers"]
  assert towers["towers"] == ["img", "pix2struct"]
  assert sorted(towers["tasks"]) == ["mp_colors", "mp_counts"]
  for entry in towers["tasks"].values():
    assert entry["examples"] == 8
    for field in ("mean_weight", "selection_frequency"):
      assert sum(entry[field]) == pytest.approx(1.0, abs=1e-6), field
  mole = {layer: groups["mome_mole"] for layer, groups in summary["layers"].items()}
  assert list(mole) == ["text/encoder/layers_0", "text/encoder/layers_1",
                        "text/decoder/layers_0", "text/decoder/layers_1"]
  for table in mole.values():
    assert table["experts"] == 3
    for entry in table["tasks"].values():  # one expert per example: fractions of examples
      assert sum(entry["load_fraction"]) == pytest.approx(1.0, abs=1e-6)
      assert all(f * 8 == pytest.approx(round(f * 8)) for f in entry["load_fraction"])
  with open(os.path.join(summary["output_dir"], "routing.json")) as f:
    assert json.load(f)["towers"] == towers
  for figure in ("tower_selection.png", "mole_experts_encoder.png",
                 "mole_experts_decoder.png"):
    assert f"figures/{figure}" in summary["figures"]
    with open(os.path.join(summary["output_dir"], "figures", figure), "rb") as f:
      assert f.read(8) == PNG_SIGNATURE, figure
