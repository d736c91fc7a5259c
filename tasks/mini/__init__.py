"""The offline mini mixture: nine seqio tasks over generated images, and their mixtures.

Importing this module registers, for the `full` dataset config:
  mini_shapes_caption  mini_shapes_count  mini_shapes_color_qa  mini_shapes_spatial_qa
  mini_digits_qa  mini_photo_caption  mini_photo_qa  mini_text_read  mini_text_caption
  mini_generalist (mixture of the nine)
  mini_trio (three of them: shapes_caption, shapes_count, text_read; smoke runs, tests)
  mini_banner_read (words on wide banners, from the dataset mini_vl_banners; in no
                    mixture here: MoME's study adds it, omni_smola/studies/mixtures.py)
and the same names with a `_tiny` suffix for the `tiny` config (tests, smoke runs), e.g.
`mini_generalist_tiny`. The dataset is generated into the data dir on first use (see
`source.py` for where); `prepare()` or `python -m tasks.mini --config full` does it ahead
of time. All use the shipped `mini` vocabulary. Re-importing, or calling
`register_mini_tasks` again, replaces the registrations.

What the mixture can show (our measurements, `mini` model at 32 px, one CPU; the README's
"The offline mini mixture" has the tables). Chance (the most common training answer, scored
on validation, % exact match), version 1.2.0: count 39.8, colour 15.6, spatial 18.0, digits
9.8, photo QA 4.0, reading 4.4. Every question task of mini_vl is learned well above chance
by a model trained on it alone from scratch, 300 steps (count 53.9, spatial 47.7, digits
37.5 / 26.6 and reading 15.6 / 34.4 at seeds 0 / 1). Earlier versions had tasks no model
learned: 1.0.0 drew digits and words too small for 32 px (digits 8.2%, reading 0%); 1.1.0
asked yes/no relations and counts up to six that stayed at chance, the relations after 1000
steps too (tasks/mini/shapes.py). In the mixture each task gets a ninth of the steps and
shares the capacity: the FT generalist's gap to per-task specialists (the paper's Table 3
delta) is the interference the studies measure (`make study`). Banner reading
(mini_vl_banners 1.0.0, in no mixture here) has chance 4.2; alone, from scratch, 300 steps,
55.5 / 52.3 at seeds 0 / 1; in MoME's study (frozen backbone and towers) it stays near
chance.
"""
from __future__ import annotations

from typing import Mapping, Optional

from omni_smola.data import CAPTION_PROMPT, VQA_PROMPT, register_vl_mixture, register_vl_task
from omni_smola.evaluation import metrics
from omni_smola.evaluation import postprocessors
from tasks.mini.builder import BANNER_SUBTASKS, FULL, SUBTASKS, TINY  # registers both datasets
from tasks.mini.builder import MiniVl, MiniVlBanners, MiniVlConfig
from tasks.mini.source import DATA_DIR_ENV, prepare, resolve_data_dir, set_data_dir
from tasks.mini.source import MiniTfdsSource

CONFIG_SUFFIXES = {"full": "", "tiny": "_tiny"}

_CAPTION = dict(prompt=CAPTION_PROMPT, metric_fns=(metrics.cider,),
                postprocess_fn=postprocessors.caption)
_SHORT_ANSWER = dict(prompt=VQA_PROMPT, metric_fns=(metrics.exact_match,),
                     postprocess_fn=postprocessors.vqa_answer)
_READING = dict(prompt=VQA_PROMPT, metric_fns=(metrics.exact_match, metrics.anls),
                postprocess_fn=postprocessors.vqa_answer)
TASK_KWARGS = {
    "shapes_caption": _CAPTION,
    "shapes_count": _SHORT_ANSWER,
    "shapes_color_qa": _SHORT_ANSWER,
    "shapes_spatial_qa": _SHORT_ANSWER,
    "digits_qa": _SHORT_ANSWER,
    "photo_caption": _CAPTION,
    "photo_qa": _SHORT_ANSWER,
    "text_read": _READING,
    "text_caption": _CAPTION,
    "banner_read": _READING,
}
assert set(TASK_KWARGS) == set(SUBTASKS) | set(BANNER_SUBTASKS)

# The photo tasks repeat 22 subjects, so they get less of the mixture.
DEFAULT_RATES = {subtask: 1.0 for subtask in TASK_KWARGS}
DEFAULT_RATES.update(photo_caption=0.5, photo_qa=0.5)


def task_name(subtask: str, config: str = "full") -> str:
  return f"mini_{subtask}{CONFIG_SUFFIXES[config]}"


# One task of each kind (a caption scored by CIDEr, a short answer, a reading answer with
# ANLS): a smoke run or a test covers every metric and postprocessor in a third of the
# nine tasks' input pipelines and evaluation.
TRIO_SUBTASKS = ("shapes_caption", "shapes_count", "text_read")


def mixture_name(config: str = "full") -> str:
  return f"mini_generalist{CONFIG_SUFFIXES[config]}"


def trio_name(config: str = "full") -> str:
  return f"mini_trio{CONFIG_SUFFIXES[config]}"


def register_mini_tasks(rates: Optional[Mapping[str, float]] = None) -> None:
  """(Re-)registers the mini tasks and mixtures; `rates` maps sub-task -> mixing rate."""
  rates = dict(DEFAULT_RATES, **(rates or {}))
  for config in CONFIG_SUFFIXES:
    for subtask, kwargs in TASK_KWARGS.items():
      register_vl_task(task_name(subtask, config), source=MiniTfdsSource(config, subtask),
                       vocabulary="mini", **kwargs)
    register_vl_mixture(mixture_name(config),
                        {task_name(subtask, config): rates[subtask] for subtask in SUBTASKS})
    register_vl_mixture(trio_name(config),
                        {task_name(subtask, config): 1.0 for subtask in TRIO_SUBTASKS})


register_mini_tasks()
