"""Evaluation results as a Markdown table: one row per task (its main metric), one column
per run, and the mean of each column."""
from typing import Dict, List, Mapping, Sequence

# The metric shown per task, by preference; tasks report one or two of these.
MAIN_METRICS = ("cider", "exact_match", "anls", "vqa_accuracy", "relaxed_accuracy")

Results = Mapping[str, Mapping[str, float]]  # {task: {metric: value}}


def main_metric(metrics: Mapping[str, float]) -> str:
  for name in MAIN_METRICS:
    if name in metrics:
      return name
  return sorted(metrics)[0]


def format_table(results: Mapping[str, Results], labels: Sequence[str]) -> str:
  """Markdown: one row per task (its main metric), one column per run, then the mean.

  `results` maps each label to that run's {task: {metric: value}}; a task a run lacks
  shows '-' and is left out of that run's mean.
  """
  tasks = sorted({task for run in results.values() for task in run})
  lines = ["| task | metric | " + " | ".join(labels) + " |",
           "|---|---|" + "---:|" * len(labels)]
  means: Dict[str, List[float]] = {label: [] for label in labels}
  for task in tasks:
    metric = main_metric(next(results[l][task] for l in labels if task in results[l]))
    cells = []
    for label in labels:
      value = results[label].get(task, {}).get(metric)
      cells.append("-" if value is None else f"{value:.1f}")
      if value is not None:
        means[label].append(value)
    lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
  lines.append("| **mean** | | " + " | ".join(
      f"**{sum(v) / len(v):.1f}**" if v else "-" for v in means.values()) + " |")
  return "\n".join(lines)
