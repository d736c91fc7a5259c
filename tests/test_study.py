"""The study runner (`python -m omni_smola.study`): a quick study of three cheap arms on two
tiny tasks (four runs), its rerun, a failing arm, and the inputs refused before any training.

One study directory is shared by the module (trained once, in-process); the rerun and the
failure checks read it.
"""
import json
import os
import re
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice_checks"))
import train_common  # noqa: E402

train_common.enable_compilation_cache()

import gin  # noqa: E402

from omni_smola import launching  # noqa: E402
import tasks.mini  # noqa: E402
from omni_smola.studies import execute, markers, runner  # noqa: E402
from omni_smola.studies.spec import StudyConfigError  # noqa: E402
from omni_smola.training import program_cache  # noqa: E402
from run_fixtures import shared_programs  # noqa: E402,F401  (a fixture)

PAIR_MODULE = "study_test_pair"
PAIR = "study_test_pair_tiny"
TASKS = ["mini_shapes_color_qa_tiny", "mini_shapes_count_tiny"]
# Every arm is the shared tiny run's configuration (train_common: the same gin files and
# bindings), so their programs are the JAX compilation cache's. Three arms: the specialists
# (one run per task), a generalist, and the generalist trained on from it (`init_from`) with
# an adapter output scale that overflows (NonFiniteLossError at step 1): one run checks both
# that `init_from` is followed and that a failing arm leaves the others done.
STUDY = """
import omni_smola.studies.spec
omni_smola.studies.spec.Study:
  name = 'test_quick'
  mixture = '%(pair)s'
  seeds = [0, 1]
  task_modules = ['tasks', '%(module)s']
  bindings = %(bindings)s
  reference_arm = 'specialists'
  quick_bindings = {'TRAIN_STEPS': 2, 'EVAL_PERIOD': 2, 'EVAL_NUM_EXAMPLES': 2}
  arms = [@specialists/omni_smola.studies.spec.Arm(), @omni/omni_smola.studies.spec.Arm(),
          @diverges/omni_smola.studies.spec.Arm()]
specialists/omni_smola.studies.spec.Arm:
  name = 'specialists'
  gin_files = %(gin_files)s
  per_task = True
omni/omni_smola.studies.spec.Arm:
  name = 'omni'
  gin_files = %(gin_files)s
diverges/omni_smola.studies.spec.Arm:
  name = 'diverges'
  gin_files = %(gin_files)s
  init_from = 'omni'
  bindings = {'omni_smola.nn.adapter_spec.AdapterSpec.alpha': 1e38}
""" % {"pair": PAIR, "module": PAIR_MODULE, "gin_files": list(train_common.GIN_FILES),
       "bindings": {**{k: v for k, v in train_common.BINDINGS.items()
                       if k != "MIXTURE_OR_TASK_NAME"}, "TRAIN_STEPS": 100,
                    # the tiny pipeline's iterator state is 32 MB a checkpoint
                    "omni_smola.training.checkpointing.CheckpointConfig.save_data_iterator":
                        False}}


@pytest.fixture(scope="module", autouse=True)
def programs_shared_by_the_module(shared_programs):
  """The rerun and the refusals run the first run's arms: its programs serve them."""
  del shared_programs


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
  before = dict(program_cache.stats)
  summary = runner.run_study(load_study(study_files), str(study_dir), quick=True)
  summary["programs"] = {k: program_cache.stats[k] - before[k] for k in before}
  return study_dir, summary


def test_quick_study_writes_one_row_per_arm_with_delta(first_run):
  study_dir, summary = first_run
  saved = json.loads((study_dir / "results.json").read_text())
  assert saved["tasks"] == TASKS and set(saved["arms"]) == {"specialists", "omni", "diverges"}
  for name in ("specialists", "omni"):
    arm = saved["arms"][name]
    assert arm["status"] == "done" and set(arm["tasks"]) == set(TASKS), (name, arm)
    assert arm["delta"]["n"] == 1 and arm["parameters"]["trainable"] > 0
    assert arm["flops"]["total"] >= arm["flops"]["backbone"] > 0
  assert saved["arms"]["specialists"]["delta"]["mean"] == 0.0
  omni = saved["arms"]["omni"]
  expected = sum(omni["tasks"][t]["mean"] - saved["arms"]["specialists"]["tasks"][t]["mean"]
                 for t in TASKS) / len(TASKS)
  assert omni["delta"]["mean"] == pytest.approx(expected)
  # The same model with another adapter scale: the same counts, from its own accounting.
  assert saved["arms"]["diverges"]["parameters"] == omni["parameters"]
  table = (study_dir / "results.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| ")]
  assert "δ to specialists" in rows[0] and len(rows) == 1 + 3, table
  assert all(os.path.getsize(study_dir / p) > 0 for p in saved["figures"])
  assert "figures/per_task.png" in saved["figures"]
  # The routing heat maps of the best routed arm.
  assert saved["routing"]["arm"] == "omni", saved["routing"]
  assert any(p.startswith("routing/") and "/figures/load_" in p for p in saved["figures"])
  # Quick: one seed of the two, in the quick bindings' two steps; init_from is followed
  # (by the failing arm, which wrote its operative config before its first step).
  record = json.loads((study_dir / "omni" / "seed_0" / markers.DONE).read_text())
  assert record["step"] == 2 and not (study_dir / "omni" / "seed_1").exists()
  operative = (study_dir / "diverges" / "seed_0" / "config.gin").read_text()
  # gin wraps a long value onto the next line: `NAME = \` then the value.
  assert re.search(r"INITIAL_CHECKPOINT_PATH = (\\\n\s*)?'.*/omni/seed_0'", operative), operative


def test_runs_of_one_model_share_their_programs(first_run):
  """The second specialist and the generalist (the same model and optimizer) trace
  nothing of their own: they reuse the first specialist's six programs (abstract
  variables, optimizer layout and init, parameter init, train step, decoder)."""
  _, summary = first_run
  assert summary["programs"]["reused"] >= 2 * 6, summary["programs"]


def test_a_diverging_arm_is_marked_failed_and_the_others_finish(first_run):
  study_dir, summary = first_run
  diverges = summary["arms"]["diverges"]
  assert diverges["status"] == "failed" and diverges["delta"] is None
  failure = markers.failed(str(study_dir / "diverges" / "seed_0"))
  assert "NonFiniteLossError" in failure["error"], failure
  assert "- diverges/seed_0: NonFiniteLossError" in (study_dir / "results.md").read_text()
  assert summary["runs"] == {"trained": 3, "skipped": 0, "failed": 1}
  assert summary["arms"]["omni"]["status"] == "done"


def test_a_rerun_trains_nothing_that_finished(first_run, study_files):
  study_dir, first = first_run
  done = {p: os.path.getmtime(p) for p in study_dir.rglob(markers.DONE)}
  second = runner.run_study(load_study(study_files), str(study_dir), quick=True)
  # The diverging arm is retried (and fails again); nothing finished trains again.
  assert second["runs"] == {"trained": 0, "skipped": 3, "failed": 1}
  assert {p: os.path.getmtime(p) for p in study_dir.rglob(markers.DONE)} == done
  assert second["arms"]["omni"]["tasks"] == first["arms"]["omni"]["tasks"]


def test_a_run_finished_on_other_data_is_refused_before_anything_trains(first_run,
                                                                        study_files, tmp_path):
  """A finished run that read another version of its dataset (mini_vl 1.1.0 where the tasks
  read 1.2.0 now) would slip its old scores into today's tables: the study stops, naming it."""
  study_dir, _ = first_run
  copy = tmp_path / "study"
  shutil.copytree(study_dir, copy)
  marker = copy / "omni" / "seed_0" / markers.DONE
  record = json.loads(marker.read_text())
  assert record["data"] == {t: "mini_vl/tiny:" + str(tasks.mini.MiniVl.VERSION) for t in TASKS}
  record["data"] = {t: "mini_vl/tiny:1.1.0" for t in TASKS}
  marker.write_text(json.dumps(record))
  failed = markers.failed(str(copy / "diverges" / "seed_0"))
  with pytest.raises(execute.StaleRunError,
                     match=r"omni/seed_0 finished on other data .*mini_vl/tiny:1\.1\.0.*"
                           r"new --study_dir"):
    runner.run_study(load_study(study_files), str(copy), quick=True)
  # Refused before training: the failed arm was not retried.
  assert markers.failed(str(copy / "diverges" / "seed_0")) == failed


@pytest.mark.parametrize("binding, message", [
    ("omni/omni_smola.studies.spec.Arm.gin_files = ['adapters/nope.gin']",
     "arm 'omni'.*nope.gin"),
    ("omni/omni_smola.studies.spec.Arm.mixture = 'no_such_task'", "arm 'omni'.*no_such_task"),
    ("specialists/omni_smola.studies.spec.Arm.bindings = "
     "{'omni_smola.nn.adapter_spec.AdapterSpec.kind': 'lorax'}", "arm 'specialists'.*lorax"),
    ("omni_smola.studies.spec.Study.seeds = []", "seeds is empty"),
    ("diverges/omni_smola.studies.spec.Arm.name = 'Omni'", "arm 'Omni'.*overwrite"),
    ("diverges/omni_smola.studies.spec.Arm.init_from = 'nobody'", "arm 'diverges'.*nobody"),
    ("omni/omni_smola.studies.spec.Arm.bindings = {'MODEL_DIR': '/tmp/x'}",
     "arm 'omni'.*MODEL_DIR"),
    ("omni_smola.studies.spec.Study.tower_routing_arms = ['omni']",
     "tower_routing_arms names arm 'omni', whose model has no tower router"),
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
  # Configured and built, not traced: the accounting of nine PaLI-3-sized models is slow.
  runs, tasks, _ = runner.prepare(study, str(tmp_path), account=False)
  assert len(study.seeds) >= 3 and len(tasks) > 5 and len(runs) > 9 * len(study.seeds)
  assert not os.listdir(tmp_path)
