"""MoME's towers from other arms of a study (`Arm.tower_checkpoints`): the runner trains the
tower stages first, binds VISION_TOWER_CHECKPOINTS to their run directories and refuses
what would read the wrong tower or none; plan and configure level, nothing trains."""
import ast
import dataclasses
import os

import pytest

from omni_smola.studies import configure, execute, markers, plan, validate
from omni_smola.studies.spec import Arm, Study, StudyConfigError, gin_binding

TOWERS = {"dinov2": "scenes", "pix2struct": ("characters", "vision_towers/reader")}


def _study(mome=None, scenes=None, **study_fields) -> Study:
  """The dependent arm first, its sources after it: the plan must reorder them."""
  arms = [Arm(**{"name": "mome", "gin_files": ["x.gin"], "init_from": "backbone",
                 "tower_checkpoints": TOWERS, **(mome or {})}),
          Arm(**{"name": "scenes", "gin_files": ["x.gin"], "init_from": "backbone",
                 "seeds": [0], "mixture": "scenes_mix", **(scenes or {})}),
          Arm(name="characters", gin_files=["x.gin"], init_from="backbone"),
          Arm(name="backbone", gin_files=["x.gin"], seeds=[0]),
          Arm(name="specialists", gin_files=["x.gin"], init_from="backbone", per_task=True)]
  return Study(name="towers", mixture="mix", seeds=[0, 1], arms=arms, **study_fields)


def _bound(bindings, name):
  line = next(b for b in bindings if b.startswith(f"{name} = "))
  return ast.literal_eval(line[len(name) + 3:])


def test_tower_stages_train_first_and_each_seed_reads_its_own_or_the_only_run():
  study = _study()
  runs = plan.plan(study, ["task_a"])
  order = [r.label for r in runs]
  for run in runs:
    for dependency in run.dependencies:
      assert order.index(dependency.label) < order.index(run.label), order
  mome = [r for r in runs if r.arm.name == "mome"]
  # One-seed stage shared by every seed; a stage with the seed gives that seed's run.
  assert [[d.label for d in r.dependencies] for r in mome] == [
      ["backbone/seed_0", "scenes/seed_0", "characters/seed_0"],
      ["backbone/seed_0", "scenes/seed_0", "characters/seed_1"]]

  _, bindings = configure.run_config(study, mome[1], "/study")
  assert _bound(bindings, "VISION_TOWER_CHECKPOINTS") == {
      "dinov2": "/study/scenes/seed_0",
      "pix2struct": ("/study/characters/seed_1", "vision_towers/reader")}
  assert _bound(bindings, "INITIAL_CHECKPOINT_PATH") == "/study/backbone/seed_0"
  # A done record keeps no study-directory path, so the directory can move.
  recorded = configure.recorded_config(*configure.run_config(study, mome[1], "/study"))
  assert not [b for b in recorded["bindings"] if "/study" in b], recorded
  # The quick study keeps the sources (its first seed only).
  assert [r.label for r in plan.plan(plan.quick(study), ["task_a"])
          if r.arm.name == "mome"] == ["mome/seed_0"]
  # An arm without towers binds none.
  scenes = next(r for r in runs if r.arm.name == "scenes")
  assert not [b for b in configure.run_config(study, scenes, "/study")[1]
              if b.startswith("VISION_TOWER_CHECKPOINTS")]


@pytest.mark.parametrize("towers, message", [
    ({"dinov2": "nobody"}, r"arm 'mome': tower_checkpoints\['dinov2'\] names no arm: 'nobody'"),
    ({"dinov2": "specialists"}, r"tower_checkpoints\['dinov2'\] 'specialists' is a per-task"),
    ({"dinov2": "mome"}, r"tower_checkpoints\['dinov2'\] names the arm itself"),
    ({"dinov2": ("scenes", "a", "b")}, r"arm 'mome': Arm.tower_checkpoints\['dinov2'\]"),
    ({"dinov2": ("scenes", "")}, r"arm 'mome': Arm.tower_checkpoints\['dinov2'\]"),
    ({"dinov2": 3}, r"arm 'mome': Arm.tower_checkpoints\['dinov2'\] = 3"),
])
def test_a_tower_source_that_cannot_be_read_is_refused(towers, message):
  with pytest.raises(StudyConfigError, match=message):
    plan.plan(_study(mome={"tower_checkpoints": towers}), ["task_a"])


def test_a_source_without_the_seed_and_a_cycle_are_refused():
  with pytest.raises(StudyConfigError, match=r"tower_checkpoints\['dinov2'\] 'scenes' has no "
                                             r"run with seed\(s\) \[1\]"):
    plan.plan(_study(scenes={"seeds": [0, 2]}), ["task_a"])
  study = Study(name="cycle", mixture="mix", seeds=[0], arms=[
      Arm(name="mome", gin_files=["x.gin"], tower_checkpoints={"dinov2": "scenes"}),
      Arm(name="scenes", gin_files=["x.gin"], tower_checkpoints={"dinov2": "mome"})])
  with pytest.raises(StudyConfigError, match="cycle: mome -> scenes -> mome"):
    plan.plan(study, ["task_a"])


def test_vision_tower_checkpoints_is_the_runners_where_it_sets_them():
  with pytest.raises(StudyConfigError, match="arm 'mome': binds VISION_TOWER_CHECKPOINTS"):
    configure.check_bindings(_study(mome={"bindings": {"VISION_TOWER_CHECKPOINTS": {}}}))
  with pytest.raises(StudyConfigError, match="arm 'mome': binds VISION_TOWER_CHECKPOINTS"):
    configure.check_bindings(_study(bindings={"VISION_TOWER_CHECKPOINTS": {}}))
  # An arm that reads no other arm's towers may name released ones (transformers dirs).
  configure.check_bindings(_study(scenes={"bindings": {"VISION_TOWER_CHECKPOINTS":
                                                           {"dinov2": "/hf/dinov2"}}}))


def test_tower_names_are_checked_against_both_models():
  arm = _study().arms[0]
  towers_of = {"mome": ["dinov2", "pix2struct"], "scenes": ["dinov2"], "characters": []}
  validate.check_tower_sources(arm, towers_of)  # 'characters' is read at a named subtree
  with pytest.raises(StudyConfigError, match="arm 'mome'.*tower 'dinov2', which its model "
                                             r"does not have .*\['pix2struct'\]"):
    validate.check_tower_sources(arm, dict(towers_of, mome=["pix2struct"]))
  with pytest.raises(StudyConfigError, match=r"tower_checkpoints\['dinov2'\] reads arm "
                                             "'scenes', whose model has no tower 'dinov2'"):
    validate.check_tower_sources(arm, dict(towers_of, scenes=["pix2struct"]))


def test_a_run_whose_tower_stage_did_not_finish_is_not_started(tmp_path):
  study = _study()
  runs = plan.plan(study, ["task_a"])
  for label in ("backbone/seed_0", "scenes/seed_0"):
    run_dir = tmp_path / label
    os.makedirs(run_dir)
    (run_dir / markers.DONE).write_text("{}")
  mome = next(r for r in runs if r.label == "mome/seed_0")
  assert execute.execute(study, [mome], str(tmp_path)) == {"trained": 0, "skipped": 0,
                                                           "failed": 1}
  error = markers.failed(str(tmp_path / "mome" / "seed_0"))["error"]
  assert error.startswith("not started: characters/seed_0"), error
  assert not (tmp_path / "mome" / "seed_0" / "checkpoints").exists()


def test_references_nest_in_binding_values():
  towers = (("dinov2", "@omni_smola.models.configs.DinoV2Config()"),)
  assert gin_binding("T", towers) == "T = (('dinov2', @omni_smola.models.configs.DinoV2Config()),)"
  assert gin_binding("T", {"a": ["%X", 1]}) == "T = {'a': [%X, 1]}"
  # A value without a reference is its repr, as before (done records stay comparable).
  for value in ([("^vision_towers/", True)], {"a": (1, "b")}, "x", ("a",)):
    assert gin_binding("T", value) == f"T = {value!r}"


def test_the_routing_maps_go_to_the_best_arm_with_any_router():
  """MoME arms have no routed adapter slot; their tower router and MoLE still count."""
  from omni_smola.analysis.routing import has_router  # pylint: disable=g-import-not-at-top
  from omni_smola.model import PaliModel  # pylint: disable=g-import-not-at-top
  from omni_smola.models.configs import CONFIGS  # pylint: disable=g-import-not-at-top
  from omni_smola.studies import plots  # pylint: disable=g-import-not-at-top
  mome = CONFIGS["tiny_mome"]
  assert has_router(PaliModel(mome))
  added = dataclasses.replace(mome, move=dataclasses.replace(mome.move, fusion="addition"))
  assert has_router(PaliModel(added))  # MoLE's router
  assert not has_router(PaliModel(dataclasses.replace(
      added, text=dataclasses.replace(added.text, mome_mole=None))))
  summary = {"arms": {"mome": {"delta": None, "mean_score": {"mean": 1.0}, "routed": True},
                      "better": {"delta": None, "mean_score": {"mean": 2.0}, "routed": False}}}
  assert plots.best_routed_arm(summary, set()) == "mome"


def test_tower_routing_arms_must_name_an_arm_with_a_tower_router():
  study = _study(tower_routing_arms=["mome"])
  routers = {"mome": True, "scenes": False, "characters": False, "backbone": False}
  validate.check_tower_routing_arms(study, routers)
  with pytest.raises(StudyConfigError, match="tower_routing_arms names 'mom', which is not an "
                                             "arm of the study"):
    validate.check_tower_routing_arms(_study(tower_routing_arms=["mom"]), routers)
  with pytest.raises(StudyConfigError, match="arm 'scenes', whose model has no tower router.*"
                                             "fusion = 'router'"):
    validate.check_tower_routing_arms(_study(tower_routing_arms=["scenes"]), routers)
  with pytest.raises(StudyConfigError, match="arm 'specialists', which trains one run per "
                                             "task"):
    validate.check_tower_routing_arms(_study(tower_routing_arms=["specialists"]),
                                      dict(routers, specialists=True))


def _towers_record(weights, chosen):
  """One seed's `towers` analysis: {task: (mean weights, selection frequencies)}."""
  return {"towers": {"towers": ["img", "p2s"], "tasks": {
      task: {"examples": 4, "mean_weight": list(weights[task]),
             "selection_frequency": list(chosen[task])} for task in weights}}}


def test_tower_weights_are_aggregated_over_the_finished_seeds_only(tmp_path):
  from omni_smola.studies import results, tower_weights  # pylint: disable=g-import-not-at-top
  study = _study(tower_routing_arms=["mome"])
  runs = plan.plan(study, ["task_a"])
  for label in ("mome/seed_0", "mome/seed_1"):
    os.makedirs(tmp_path / label)
  (tmp_path / "mome" / "seed_0" / markers.DONE).write_text("{}")
  (tmp_path / "mome" / "seed_1" / markers.DONE).write_text("{}")
  analysed = {}
  per_seed = {0: _towers_record({"banner": (0.2, 0.8)}, {"banner": (0.0, 1.0)}),
              1: _towers_record({"banner": (0.6, 0.4)}, {"banner": (0.75, 0.25)})}

  def analyse(study_, run, study_dir, output_dir):
    del study_, study_dir
    analysed[run.seed] = output_dir
    return per_seed[run.seed]

  summary = tower_weights.summarize(study, runs, str(tmp_path), analyse=analyse)
  assert analysed == {s: str(tmp_path / "routing" / "mome" / f"seed_{s}") for s in (0, 1)}
  banner = summary["mome"]["tasks"]["banner"]
  assert banner["img"]["mean"] == pytest.approx(0.4)
  assert banner["img"]["std"] == pytest.approx(0.2 * 2 ** 0.5)  # sample std of 0.2, 0.6
  assert (banner["img"]["top_on_seeds"], banner["p2s"]["top_on_seeds"]) == ([1], [0])
  text = results.markdown({"tasks": [], "metrics": {}, "arms": {}, "study": "s",
                          "quick": False, "mixture": "m", "reference_arm": None,
                          "tower_routing": summary})
  assert "| banner | 0.40 ± 0.28 [1] | 0.60 ± 0.28 [0] |" in text, text
  # A seed whose analysis fails is left out and named; one seed shows no spread.
  def second_fails(study_, run, study_dir, output_dir):
    if run.seed == 1:
      raise ValueError("no checkpoint")
    return analyse(study_, run, study_dir, output_dir)
  summary = tower_weights.summarize(study, runs, str(tmp_path), analyse=second_fails)
  assert summary["mome"]["seeds"] == [0]
  assert summary["mome"]["errors"] == {"1": "ValueError: no checkpoint"}
  lines = tower_weights.markdown_lines(summary)
  assert "| banner | 0.20 | 0.80 [0] |" in lines, lines
  assert any("seed 1: not analysed (ValueError: no checkpoint)" in line for line in lines)
  # Without a finished seed the arm is reported, not fatal.
  for seed in (0, 1):
    (tmp_path / "mome" / f"seed_{seed}" / markers.DONE).unlink()
  assert tower_weights.summarize(study, runs, str(tmp_path), analyse=analyse) == {
      "mome": {"errors": {"all": "no finished seed"}}}
