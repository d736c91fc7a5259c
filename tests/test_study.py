"""The study runner (`python -m omni_smola.study`): a quick study of three cheap arms on two
tiny tasks, its rerun, a failing arm, and the inputs refused before any training.

One study directory is shared by the module (trained once, in-process); the rerun and the
failure checks read it.
"""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice_checks"))
import train_common  # noqa: E402

train_common.enable_compilation_cache()

import gin  # noqa: E402

from omni_smola import launching  # noqa: E402
from omni_smola.studies import markers, runner  # noqa: E402
from omni_smola.studies.spec import StudyConfigError  # noqa: E402

PAIR_MODULE = "study_test_pair"
PAIR = "study_test_pair_tiny"
TASKS = ["mini_shapes_color_qa_tiny", "mini_shapes_count_tiny"]
TINY = ("omni_smola.models.configs.T5Config.vocab_size = 1024\n"
        "omni_smola.nn.adapter_spec.AdapterSpec.rank = 2\n")
# Three arms and a stage, two steps each: the FT backbone, the specialists on it, LoRA on it,
# and a LoRA arm whose learning rate overflows the parameters (a NaN loss at step 2).
STUDY = """
import omni_smola.studies.spec
COMMON = ['models/tiny.gin', 'runs/generalist.gin']
omni_smola.studies.spec.Study:
  name = 'test_quick'
  mixture = '%(pair)s'
  seeds = [0, 1]
  task_modules = ['tasks', '%(module)s']
  bindings = {'EVAL_PERIOD': '%%TRAIN_STEPS', 'CHECKPOINT_PERIOD': '%%TRAIN_STEPS',
              'TASK_FEATURE_LENGTHS': {'inputs': 16, 'targets': 16}, 'BATCH_SIZE': 8,
              'EVAL_BATCH_SIZE': 8, 'EVAL_NUM_EXAMPLES': 2,
              'omni_smola.models.configs.T5Config.vocab_size': 1024,
              'omni_smola.training.checkpointing.CheckpointConfig.keep_best': False}
  reference_arm = 'specialists'
  quick_bindings = {'TRAIN_STEPS': 2, 'WARMUP_STEPS': 1}
  arms = [@ft/omni_smola.studies.spec.Arm(), @specialists/omni_smola.studies.spec.Arm(),
          @lora/omni_smola.studies.spec.Arm(), @diverges/omni_smola.studies.spec.Arm()]
ft/omni_smola.studies.spec.Arm:
  name = 'ft'
  gin_files = ['models/tiny.gin', 'adapters/full.gin', 'runs/pretrain.gin']
  bindings = {'TRAIN_STEPS': 100}
specialists/omni_smola.studies.spec.Arm:
  name = 'specialists'
  gin_files = ['models/tiny.gin', 'adapters/full.gin', 'runs/pretrain.gin']
  init_from = 'ft'
  per_task = True
  bindings = {'TRAIN_STEPS': 100}
lora/omni_smola.studies.spec.Arm:
  name = 'lora'
  gin_files = ['models/tiny.gin', 'adapters/lora.gin', 'runs/generalist.gin']
  init_from = 'ft'
  bindings = {'TRAIN_STEPS': 100, 'omni_smola.nn.adapter_spec.AdapterSpec.rank': 2}
diverges/omni_smola.studies.spec.Arm:
  name = 'diverges'
  gin_files = ['models/tiny.gin', 'adapters/lora.gin', 'runs/generalist.gin']
  init_from = 'ft'
  bindings = {'TRAIN_STEPS': 100, 'LEARNING_RATE': 1e30,
              'omni_smola.nn.adapter_spec.AdapterSpec.rank': 2}
""" % {"pair": PAIR, "module": PAIR_MODULE}


@pytest.fixture(scope="module")
def study_files(tmp_path_factory):
  """The study gin file and the module registering its two-task mixture."""
  root = tmp_path_factory.mktemp("study")
  (root / f"{PAIR_MODULE}.py").write_text(
      "from omni_smola.data import register_vl_mixture\nimport tasks.mini\n"
      f"register_vl_mixture({PAIR!r}, {{t: 1.0 for t in {TASKS!r}}})\n")
  sys.path.insert(0, str(root))
  (root / "study.gin").write_text(STUDY)
  data_dir = train_common.prepare_data(str(tmp_path_factory.getbasetemp().parent / "mini_tiny"))
  import seqio  # pylint: disable=g-import-not-at-top
  seqio.set_tfds_data_dir_override(data_dir)
  return root


def load_study(root, *bindings, quick=True):
  gin.clear_config()
  launching.parse_gin([str(root / "study.gin")], list(bindings), finalize=False)
  return runner.configured_study(quick)


@pytest.fixture(scope="module")
def first_run(study_files):
  study_dir = study_files / "quick"
  summary = runner.run_study(load_study(study_files), str(study_dir), quick=True)
  return study_dir, summary


def test_quick_study_writes_one_row_per_arm_with_delta(first_run):
  study_dir, summary = first_run
  saved = json.loads((study_dir / "results.json").read_text())
  assert saved["tasks"] == TASKS and set(saved["arms"]) == {"ft", "specialists", "lora",
                                                           "diverges"}
  for name in ("ft", "specialists", "lora"):
    arm = saved["arms"][name]
    assert arm["status"] == "done" and set(arm["tasks"]) == set(TASKS), (name, arm)
    assert arm["delta"]["n"] == 1 and arm["parameters"]["trainable"] > 0
    assert arm["flops"]["total"] >= arm["flops"]["backbone"] > 0
  assert saved["arms"]["specialists"]["delta"]["mean"] == 0.0
  lora = saved["arms"]["lora"]
  expected = sum(lora["tasks"][t]["mean"] - saved["arms"]["specialists"]["tasks"][t]["mean"]
                 for t in TASKS) / len(TASKS)
  assert lora["delta"]["mean"] == pytest.approx(expected)
  assert lora["parameters"]["trainable"] < saved["arms"]["ft"]["parameters"]["trainable"]
  table = (study_dir / "results.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| ")]
  assert "δ to specialists" in rows[0] and len(rows) == 1 + 4, table
  assert all(os.path.getsize(study_dir / p) > 0 for p in saved["figures"])
  assert "figures/per_task.png" in saved["figures"]
  # Quick: one seed of the two, in the quick bindings' two steps.
  assert json.loads((study_dir / "lora" / "seed_0" / markers.DONE).read_text())["step"] == 2
  assert not (study_dir / "lora" / "seed_1").exists()


def test_a_diverging_arm_is_marked_failed_and_the_others_finish(first_run):
  study_dir, summary = first_run
  diverges = summary["arms"]["diverges"]
  assert diverges["status"] == "failed" and diverges["delta"] is None
  failure = markers.failed(str(study_dir / "diverges" / "seed_0"))
  assert "NonFiniteLossError" in failure["error"], failure
  assert "diverges, seed 0: NonFiniteLossError" in (study_dir / "results.md").read_text()
  assert summary["runs"] == {"trained": 4, "skipped": 0, "failed": 1}


def test_a_rerun_trains_nothing_that_finished(first_run, study_files):
  study_dir, first = first_run
  done = {p: os.path.getmtime(p) for p in study_dir.rglob(markers.DONE)}
  second = runner.run_study(load_study(study_files), str(study_dir), quick=True)
  # The diverging arm is retried (and fails again); nothing finished trains again.
  assert second["runs"] == {"trained": 0, "skipped": 4, "failed": 1}
  assert {p: os.path.getmtime(p) for p in study_dir.rglob(markers.DONE)} == done
  assert second["arms"]["lora"]["tasks"] == first["arms"]["lora"]["tasks"]


@pytest.mark.parametrize("binding, message", [
    ("lora/omni_smola.studies.spec.Arm.gin_files = ['adapters/nope.gin']",
     "arm 'lora'.*nope.gin"),
    ("lora/omni_smola.studies.spec.Arm.mixture = 'no_such_task'", "arm 'lora'.*no_such_task"),
    ("lora/omni_smola.studies.spec.Arm.bindings = "
     "{'omni_smola.nn.adapter_spec.AdapterSpec.kind': 'lorax'}", "arm 'lora'.*lorax"),
    ("omni_smola.studies.spec.Study.seeds = []", "seeds is empty"),
    ("diverges/omni_smola.studies.spec.Arm.name = 'LoRA'", "arm 'LoRA'.*overwrite"),
    ("lora/omni_smola.studies.spec.Arm.init_from = 'nobody'", "arm 'lora'.*nobody"),
])
def test_bad_study_is_refused_before_training(study_files, tmp_path, binding, message):
  study = load_study(study_files, binding, quick=False)
  with pytest.raises(StudyConfigError, match=message):
    runner.run_study(study, str(tmp_path / "bad"))
  assert not any(tmp_path.rglob("checkpoints"))


def test_the_paper_scale_study_validates_without_training(tmp_path):
  gin.clear_config()
  launching.parse_gin(["studies/pali3_table3.gin"], [], finalize=False)
  study = runner.configured_study(quick=False)
  runs, tasks, accounts = runner.prepare(study, str(tmp_path))
  assert len(study.seeds) >= 3 and len(tasks) > 5
  assert accounts["smola_o48"]["adapters"]["adapter"] == "omni_smola"
  assert not os.listdir(tmp_path)
