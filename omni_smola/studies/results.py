"""A study's runs summarised: per arm and task the mean and std over seeds, delta to the
specialists, parameters and FLOPs; written as results.json and results.md.

delta (the Omni-SMoLA paper's Table 3): an arm's score on a task minus the reference
(per-task specialist) arm's score on that task, averaged over the tasks. It is computed per
seed (against the specialist of the same seed, or the specialists' mean when that seed has
none) and its mean and std are over seeds. std is the sample standard deviation (ddof 1);
one seed gives 0.
"""
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from omni_smola.evaluation import tables
from omni_smola.studies import markers, tower_weights
from omni_smola.studies.spread import mean_std
from omni_smola.studies.plan import Run, seeds_of
from omni_smola.studies.spec import Study


def _arm_seeds(study: Study, arm_runs: Sequence[Run], study_dir: str,
               tasks: Sequence[str]) -> Dict[int, Dict[str, Any]]:
  """{seed: {'status', 'scores': {task: score}, 'metrics', 'errors'}} of one arm."""
  seeds = {}
  for seed in sorted({r.seed for r in arm_runs}):
    scores, metrics, errors = {}, {}, []
    for run in (r for r in arm_runs if r.seed == seed):
      run_dir = os.path.join(study_dir, run.directory)
      record = markers.done(run_dir)
      if record is None:
        failure = markers.failed(run_dir)
        errors.append(f"{run.label}: " + (failure["error"] if failure else "not run"))
        continue
      for task in ([run.task] if run.task else tasks):
        if task in record["scores"]:
          scores[task] = record["scores"][task]
          metrics[task] = record["metrics"][task]
    seeds[seed] = {"status": "failed" if errors else "done", "scores": scores,
                   "metrics": metrics, "errors": errors}
  return seeds


def _delta(seeds: Mapping[int, Dict[str, Any]], reference: Mapping[int, Dict[str, Any]],
           tasks: Sequence[str]) -> Optional[Dict[str, Any]]:
  ok = {s: v["scores"] for s, v in reference.items() if v["status"] == "done"}
  if not ok:
    return None
  reference_mean = {t: float(np.mean([scores[t] for scores in ok.values()])) for t in tasks}
  per_seed = {}
  for seed, value in seeds.items():
    if value["status"] != "done" or not all(t in value["scores"] for t in tasks):
      continue
    base = ok.get(seed, reference_mean)
    per_seed[seed] = float(np.mean([value["scores"][t] - base[t] for t in tasks]))
  return dict(mean_std(list(per_seed.values())), per_seed=per_seed) if per_seed else None


def _seed_means(seeds: Mapping[int, Dict[str, Any]], tasks: Sequence[str]) -> Dict[int, float]:
  """{seed: the mean over tasks of its scores} for the seeds that finished every task."""
  return {seed: float(np.mean([v["scores"][t] for t in tasks])) for seed, v in seeds.items()
          if v["status"] == "done" and all(t in v["scores"] for t in tasks)}


def _comparison(a: Mapping[int, float], b: Mapping[int, float]) -> Optional[Dict[str, Any]]:
  """A minus B per seed, its mean ± std, and the verdict on "A above B".

  Seeds pair by number; an arm with a single seed (a shared backbone) pairs with every seed
  of the other, so the spread is then the other arm's alone. The claim holds when the mean
  difference exceeds its std, is reversed below minus its std, and is otherwise within
  the spread; with one pair there is no spread and no verdict.
  """
  if len(a) == 1 and len(b) > 1:
    a = {seed: next(iter(a.values())) for seed in b}
  elif len(b) == 1 and len(a) > 1:
    b = {seed: next(iter(b.values())) for seed in a}
  per_seed = {seed: a[seed] - b[seed] for seed in sorted(set(a) & set(b))}
  if not per_seed:
    return None
  stats = mean_std(list(per_seed.values()))
  if stats["n"] < 2:
    verdict = "one seed: no spread"
  elif stats["mean"] > stats["std"]:
    verdict = "holds"
  elif stats["mean"] < -stats["std"]:
    verdict = "reversed"
  else:
    verdict = "within the spread"
  return dict(stats, per_seed=per_seed, verdict=verdict)


def summarize(study: Study, runs: Sequence[Run], study_dir: str, tasks: Sequence[str],
              accounts: Mapping[str, Any], quick: bool) -> Dict[str, Any]:
  """The results of every reported arm (and the reference), JSON-serialisable."""
  arms: Dict[str, Any] = {}
  seeds_by_arm = {}
  for arm in study.arms:
    seeds_by_arm[arm.name] = _arm_seeds(study, [r for r in runs if r.arm.name == arm.name],
                                        study_dir, tasks)
  reference = seeds_by_arm.get(study.reference_arm) if study.reference_arm else None
  metric_names: Dict[str, str] = {}
  for arm in study.arms:
    if not arm.report:
      continue
    seeds = seeds_by_arm[arm.name]
    done = [v for v in seeds.values() if v["status"] == "done"]
    per_task = {}
    for task in tasks:
      values = [v["scores"][task] for v in done if task in v["scores"]]
      if values:
        per_task[task] = mean_std(values)
        metric_names.setdefault(task, tables.main_metric(done[0]["metrics"][task]))
    arms[arm.name] = {
        "status": ("done" if len(done) == len(seeds) else "failed" if not done else "partial"),
        "seeds": {str(s): v for s, v in seeds.items()},
        "expected_seeds": seeds_of(study, arm),
        "tasks": per_task,
        "mean_score": (mean_std(list(_seed_means(seeds, tasks).values()))
                       if done else None),
        "delta": _delta(seeds, reference, tasks) if reference is not None else None,
        **accounts.get(arm.name, {}),
    }
  comparisons = {}
  for claim, (better, other) in study.comparisons.items():
    comparisons[claim] = {"arms": [better, other], **(_comparison(
        _seed_means(seeds_by_arm[better], tasks), _seed_means(seeds_by_arm[other], tasks))
        or {"verdict": "not run"})}
  return {"study": study.name, "quick": quick, "mixture": study.mixture, "tasks": list(tasks),
          "metrics": metric_names, "reference_arm": study.reference_arm,
          "scaling_arms": dict(study.scaling_arms), "arms": arms, "comparisons": comparisons}


def _cell(stats: Optional[Mapping[str, float]], signed: bool = False) -> str:
  if not stats:
    return "-"
  mean = f"{stats['mean']:+.2f}" if signed else f"{stats['mean']:.1f}"
  return f"{mean} ± {stats['std']:.2f}" if signed else f"{mean} ± {stats['std']:.1f}"


def _count(n: Optional[float]) -> str:
  from omni_smola.params import human  # pylint: disable=g-import-not-at-top
  return "-" if n is None else human(n)


def markdown(summary: Mapping[str, Any]) -> str:
  """One row per arm: mean ± std per task, delta, parameters and FLOPs, status."""
  tasks = summary["tasks"]
  header = (["arm"] + [f"{t} ({summary['metrics'].get(t, '?')})" for t in tasks]
            + ["mean", "δ to specialists", "trainable params", "adapter params",
               "FLOPs / example", "seeds", "status"])
  lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + "---|"]
  for name, arm in summary["arms"].items():
    done = sum(1 for v in arm["seeds"].values() if v["status"] == "done")
    parameters, flops = arm.get("parameters", {}), arm.get("flops", {})
    cells = ([name] + [_cell(arm["tasks"].get(t)) for t in tasks]
             + [_cell(arm["mean_score"]), _cell(arm["delta"], signed=True),
                _count(parameters.get("trainable")), _count(parameters.get("adapters")),
                _count(flops.get("total")), f"{done}/{len(arm['expected_seeds'])}",
                arm["status"]])
    lines.append("| " + " | ".join(cells) + " |")
  notes = [f"\n{summary['study']}{' (quick)' if summary['quick'] else ''}: validation scores "
           f"on {summary['mixture']}, mean ± std over seeds; δ is the arm's score minus the "
           f"per-task specialists' ({summary['reference_arm']}), averaged over tasks, per "
           "seed. FLOPs: forward, one example (omni_smola.accounting)."]
  for arm in summary["arms"].values():
    for value in arm["seeds"].values():
      notes.extend(f"- {error.splitlines()[0][:300]}" for error in value["errors"])
  return "\n".join(lines + notes + _comparison_lines(summary.get("comparisons", {}))
                   + tower_weights.markdown_lines(summary.get("tower_routing", {}))) + "\n"


def _comparison_lines(comparisons: Mapping[str, Any]) -> List[str]:
  """The claims table: A's mean score minus B's, per seed and mean ± std, and the verdict."""
  if not comparisons:
    return []
  lines = ["", "| claim (A above B) | A | B | A - B per seed | mean ± std | verdict |",
           "|---|---|---|---|---:|---|"]
  for claim, c in comparisons.items():
    per_seed = ", ".join(f"{d:+.2f}" for d in c.get("per_seed", {}).values()) or "-"
    lines.append(f"| {claim} | {c['arms'][0]} | {c['arms'][1]} | {per_seed} | "
                 f"{_cell(c if 'mean' in c else None, signed=True)} | {c['verdict']} |")
  lines.append("\nA - B: the difference of the arms' mean scores over tasks, paired by seed "
               "(a one-seed arm pairs with every seed of the other); it holds when the mean "
               "exceeds its std.")
  return lines


def write(summary: Mapping[str, Any], study_dir: str) -> List[str]:
  """results.json and results.md in `study_dir`, each replaced atomically."""
  paths = []
  for name, text in (("results.json", json.dumps(summary, indent=1, sort_keys=True)),
                     ("results.md", markdown(summary))):
    path = os.path.join(study_dir, name)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
    paths.append(path)
  return paths
