"""The study's claims table (`Study.comparisons`): A's mean score minus B's, paired by seed,
with its spread and a verdict; built from fabricated run records, nothing trains."""
import json
import os

import pytest

from omni_smola.studies import markers, plan, results
from omni_smola.studies.spec import Arm, Study, StudyConfigError

TASKS = ["task_a", "task_b"]


def _study(**comparisons) -> Study:
  return Study(name="claims", mixture="mix", seeds=[0, 1, 2],
               arms=[Arm(name="backbone", gin_files=["x.gin"], seeds=[0]),
                     Arm(name="adapters", gin_files=["x.gin"], init_from="backbone"),
                     Arm(name="control", gin_files=["x.gin"], init_from="backbone")],
               comparisons=comparisons)


def _write_scores(study_dir, runs, scores_by_arm):
  """study_done.json for each run: {arm: {seed: (score on task_a, score on task_b)}}."""
  for run in runs:
    run_dir = os.path.join(study_dir, run.directory)
    os.makedirs(run_dir)
    a, b = scores_by_arm[run.arm.name][run.seed]
    record = {"scores": {"task_a": a, "task_b": b},
              "metrics": {"task_a": {"exact_match": a}, "task_b": {"exact_match": b}}}
    with open(os.path.join(run_dir, markers.DONE), "w") as f:
      json.dump(record, f)


def test_differences_pair_by_seed_and_a_one_seed_arm_pairs_with_every_seed(tmp_path):
  study = _study(**{"adapters above control": ("adapters", "control"),
                    "adapters above backbone": ("adapters", "backbone"),
                    "control above adapters": ("control", "adapters")})
  runs = plan.plan(study, TASKS)
  _write_scores(str(tmp_path), runs, {
      "backbone": {0: (10.0, 20.0)},
      "adapters": {0: (14.0, 22.0), 1: (13.0, 23.0), 2: (12.0, 26.0)},  # means 18, 18, 19
      "control": {0: (10.0, 22.0), 1: (11.0, 23.0), 2: (9.0, 26.0)}})   # means 16, 17, 17.5
  summary = results.summarize(study, runs, str(tmp_path), TASKS, {}, quick=False)
  claims = summary["comparisons"]

  above_control = claims["adapters above control"]
  assert above_control["per_seed"] == {0: 2.0, 1: 1.0, 2: 1.5}
  assert above_control["mean"] == pytest.approx(1.5)
  assert above_control["std"] == pytest.approx(0.5)
  assert above_control["verdict"] == "holds"
  # The backbone's one seed (mean 15) pairs with each of the adapters' three.
  assert claims["adapters above backbone"]["per_seed"] == {0: 3.0, 1: 3.0, 2: 4.0}
  assert claims["control above adapters"]["verdict"] == "reversed"

  table = results.markdown(summary)
  assert "| adapters above control | adapters | control | +2.00, +1.00, +1.50 | +1.50 ± 0.50 | holds |" in table


def test_a_difference_inside_its_spread_is_not_a_result(tmp_path):
  study = _study(**{"adapters above control": ("adapters", "control")})
  runs = plan.plan(study, TASKS)
  _write_scores(str(tmp_path), runs, {
      "backbone": {0: (10.0, 20.0)},
      "adapters": {0: (14.0, 22.0), 1: (10.0, 22.0), 2: (12.0, 26.0)},  # means 18, 16, 19
      "control": {0: (10.0, 22.0), 1: (11.0, 23.0), 2: (9.0, 26.0)}})   # means 16, 17, 17.5
  claim = results.summarize(study, runs, str(tmp_path), TASKS, {}, quick=False)[
      "comparisons"]["adapters above control"]
  assert claim["per_seed"] == {0: 2.0, 1: -1.0, 2: 1.5}
  assert claim["verdict"] == "within the spread"


def test_an_unfinished_arm_leaves_its_claims_not_run(tmp_path):
  study = _study(**{"adapters above control": ("adapters", "control")})
  runs = [r for r in plan.plan(study, TASKS) if r.arm.name != "control"]
  _write_scores(str(tmp_path), runs, {"backbone": {0: (1.0, 1.0)},
                                      "adapters": {s: (1.0, 1.0) for s in range(3)}})
  claim = results.summarize(study, runs, str(tmp_path), TASKS, {}, quick=False)[
      "comparisons"]["adapters above control"]
  assert claim == {"arms": ["adapters", "control"], "verdict": "not run"}


@pytest.mark.parametrize("pair", [("adapters", "nobody"), ("adapters",)])
def test_a_claim_naming_no_arm_is_refused(pair):
  with pytest.raises(StudyConfigError, match="comparisons.*claim x"):
    plan.plan(_study(**{"claim x": pair}), TASKS)
